"""Position map: how each pool batch's own end loss depends on where in training it is seen.

M[i, j] = estimated loss on pool batch i after training, when batch i is moved to position j of the reference order
(the other batches keep their relative order; a batch trained several times moves its last visit). Low values at
late positions and high values early show memorisation fading with time; a flat row means the batch's content is
learned from the rest of the data anyway.
"""

from __future__ import annotations

import numbers
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lpl.utils.errors import LplError
from lpl.utils.io import atomic_save_figure

if TYPE_CHECKING:
    from lpl.order.estimator import OrderEstimator


def moved(order: Tensor, batch: int, position: int) -> Tensor:
    """``order`` with ``batch`` taken out and inserted at ``position``; in a run that trains the batch several
    times (epochs over one pool), its last visit moves: the one that sets its end loss."""
    where = int((order == batch).nonzero()[-1])
    rest = torch.cat([order[:where], order[where + 1 :]])
    return torch.cat([rest[:position], order[where : where + 1], rest[position:]])


def id_list(values: Any, what: str) -> list[int]:
    """A non-empty list of whole numbers (pool batch ids or positions), or LplError."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise LplError(f"{what} must be a list of whole numbers, got {values!r:.40}.")
    values = values.tolist() if isinstance(values, Tensor) else list(values)
    if not values or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in values):
        raise LplError(f"{what} must be a non-empty list of whole numbers, got {values!r:.60}.")
    return [int(v) for v in values]


def position_map(
    estimator: OrderEstimator,
    batches: Sequence[int] | None = None,
    *,
    positions: Sequence[int] | None = None,
    chunk: int = 512,
    logger: Any = None,
) -> Tensor:
    """M [len(batches), len(positions)]: estimated end loss of pool batch ``batches[i]`` placed at ``positions[j]``.

    ``batches`` default to every batch of the reference order, ``positions`` to every step. ``logger``: optional
    Lightning logger; with a W&B logger the heatmap is logged as an image. In a run that trains a batch several times
    (epochs over one pool) its last visit moves (``moved``): placed before its earlier visits, the batch is last seen
    at the next-to-last one, so those columns repeat the same order. The map reads each order's per-batch end losses:
    method ``adjoint`` has only the final validation loss of its own, so its map is ``first_order``'s (``replay``).

    Example::

        m = position_map(OrderEstimator.from_recording(path, method="adam"))
        plot_position_map(m, "position_map.png")
    """
    reference = estimator.reference_order.cpu()
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise LplError(f"chunk must be a whole number >= 1 (orders estimated at once), got {chunk!r}.")
    batches = sorted(set(reference.tolist())) if batches is None else id_list(batches, "batches")
    positions = list(range(len(reference))) if positions is None else id_list(positions, "positions")
    missing = [b for b in batches if b not in set(reference.tolist())]
    if missing:
        raise LplError(
            f"batch id {missing[0]} is not in the reference order (pool batch ids 0..{estimator.num_batches - 1} "
            "that the reference run trained); choose batches from the recording's order."
        )
    bad = [p for p in positions if not 0 <= p < len(reference)]
    if bad:
        raise LplError(f"position {bad[0]} is outside the {len(reference)} steps of the reference order.")
    pairs = [(i, j) for i in range(len(batches)) for j in range(len(positions))]
    orders = torch.stack([moved(reference, batches[i], positions[j]) for i, j in pairs])
    values = torch.empty(len(pairs))
    rows = torch.tensor([batches[i] for i, _ in pairs])
    started = time.perf_counter()
    for start in range(0, len(pairs), chunk):
        result = estimator.estimate_many(orders[start : start + chunk])
        values[start : start + chunk] = result.batch_losses.cpu()[
            torch.arange(result.batch_losses.shape[0]), rows[start : start + chunk]
        ]
        if len(pairs) > chunk:  # long maps show progress
            done = min(start + chunk, len(pairs))
            rank_zero_info(f"position_map: {done}/{len(pairs)} orders ({time.perf_counter() - started:.1f} s)")
    matrix = values.view(len(batches), len(positions))
    if logger is not None and hasattr(logger, "log_image"):
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            path = plot_position_map(matrix, Path(folder) / "position_map.png", batches=batches, positions=positions)
            logger.log_image(key="order/position_map", images=[str(path)])
    return matrix


def plot_position_map(
    matrix: Tensor, path: str | Path, *, batches: Sequence[int] | None = None, positions: Sequence[int] | None = None,
    title: str = "estimated end loss of batch i placed at position j",
) -> Path:
    """Save the map as a heatmap PNG (rows: batches, columns: positions); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    figure, axis = plt.subplots(figsize=(7, 5))
    shown = matrix - matrix.mean(dim=1, keepdim=True)  # each row's own offset hides the position effect
    image = axis.imshow(shown.numpy(), aspect="auto", cmap="coolwarm", origin="upper")
    axis.set_xlabel("position j of the batch's (last) visit in training")
    axis.set_ylabel("pool batch i")
    if positions is not None and len(positions) <= 32:
        axis.set_xticks(range(len(positions)), [str(p) for p in positions], fontsize=6)
    if batches is not None and len(batches) <= 32:
        axis.set_yticks(range(len(batches)), [str(b) for b in batches], fontsize=6)
    axis.set_title(title + " (row mean removed)", fontsize=9)
    figure.colorbar(image, ax=axis, label="loss - row mean")
    figure.tight_layout()
    atomic_save_figure(figure, path)
    return path
