"""Which curvature does the linearised replay need: the reference batch's, or the batch each order feeds?

``lpl.order.linearized`` corrects each replayed gradient g_b(theta_s) by H_s Delta_s with H_s the top-k eigenpairs of
the *reference* batch's Hessian at step s (one factor per step, order independent). DESIGN.md says the curvature
must be the batch's own. This script replays the digits task's retrained orders with the linearised replay (float64
torch ops, each order's own Adam moments, as ``second_moment_ablation.py``) and swaps only the curvature term:

- the stored rank-16 factor of the reference batch (what method ``linearized`` runs), or none at all;
- exact Hessian-vector products of the reference batch at theta_s, or of the batch the order feeds there (these
  need the model at every step, so no recording could hold them);
- rank-4 / 16 / 32 eigenpairs of the fed batch's own Hessian (what a recording could hold, at num_batches times
  the storage of the reference factors).

Scores: Spearman and mean absolute error of estimated vs retrained final validation loss, against "no change".

Usage::

    python benchmarks/batch_curvature_ablation.py --out benchmarks/results/batch_curvature_ablation.md
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

import order_estimation as bench  # noqa: E402
from second_moment_ablation import HESSIAN_RANK, Replay, digits_task, run_ablation  # noqa: E402
from lpl.order import quantities  # noqa: E402
from lpl.order.adjoint import _Progress, _rerun_reference  # noqa: E402  (the re-run reference, probed at its steps)
from lpl.utils.errors import run_script  # noqa: E402


class CurvatureReplay(Replay):
    """The linearised replay with the curvature term ``H Delta`` chosen per variant (``curvature``)."""

    def __init__(self, run, reference: Tensor, rerun, orders: Tensor) -> None:
        super().__init__(run, reference)
        self.rerun, self.orders = rerun, orders
        self.curvature: Callable[[int, Tensor], Tensor] = super()._curvature
        self._factors: dict[tuple[int, int, int], tuple[Tensor, Tensor]] = {}

    def _curvature(self, s: int, delta: Tensor) -> Tensor:
        return self.curvature(s, delta)

    def _batch_hvp(self, s: int, batch: int) -> Callable[[Tensor], Tensor]:
        _, _, grads = self.rerun.gradients_at(s, self.rerun.batch_loss(batch), True, training=True)
        return quantities.hessian_vector_product(grads, self.rerun.params)

    def exact(self, fed: bool) -> Callable[[int, Tensor], Tensor]:
        """Exact H Delta of the batch each order feeds at s (``fed``) or of the reference batch."""
        def curvature(s: int, delta: Tensor) -> Tensor:
            batches = self.orders[:, s] if fed else self.reference[s].repeat(delta.shape[0])
            out = torch.zeros_like(delta)
            for batch in batches.unique().tolist():
                with torch.enable_grad():
                    product = self._batch_hvp(s, batch)
                    for row in (batches == batch).nonzero().flatten().tolist():
                        out[row] = product(delta[row].float()).double()
            return out

        return curvature

    def own_low_rank(self, rank: int) -> Callable[[int, Tensor], Tensor]:
        """Top-``rank`` eigenpairs (Lanczos, 3 x rank steps, as the recorded factors) of each fed batch's Hessian."""
        def curvature(s: int, delta: Tensor) -> Tensor:
            batches, out = self.orders[:, s], torch.zeros_like(delta)
            for batch in batches.unique().tolist():
                if (s, batch, rank) not in self._factors:
                    with torch.enable_grad():
                        _, grad, grads = self.rerun.gradients_at(s, self.rerun.batch_loss(batch), True, training=True)
                        product = quantities.hessian_vector_product(grads, self.rerun.params)
                        vectors, values = quantities.top_curvature(product, grad, rank, 3 * rank)
                    self._factors[(s, batch, rank)] = (vectors.double(), values.double())
                vectors, values = self._factors[(s, batch, rank)]
                rows = (batches == batch).nonzero().flatten()
                out[rows] = ((delta[rows] @ vectors.T) * values) @ vectors
            return out

        return curvature

    def variants(self) -> dict[str, np.ndarray]:
        stored = self.curvature
        choices = {
            f"reference batch, stored rank {HESSIAN_RANK} (= method linearized)": stored,
            "none": lambda s, delta: torch.zeros_like(delta),
            "reference batch, exact HVP": self.exact(fed=False),
            "fed batch, exact HVP": self.exact(fed=True),
            **{f"fed batch, rank {rank}": self.own_low_rank(rank) for rank in (4, 16, 32)},
        }
        out = {}
        for name, curvature in choices.items():
            self.curvature = curvature
            out[name] = self.own_moments(self.orders, None)
        self.curvature = stored
        return out


def ablate(lr: float, args) -> tuple[float, dict[str, dict[str, float]]]:
    recording, run, orders, truth, no_change = digits_task(lr, args)
    rerun, _, _ = _rerun_reference(recording, 0, "cpu", _Progress(lambda message: None, recording.num_steps))
    replay = CurvatureReplay(run, torch.tensor(recording.order), rerun, orders)
    scores = {name: bench.metrics(estimate, truth) for name, estimate in replay.variants().items()}
    print(f"[lr={lr}] no-change MAE {no_change:.4f}; " + "; ".join(
        f"{name}: {s['spearman']:.2f} / {s['mae'] / no_change:.2f}x" for name, s in scores.items()), flush=True)
    return no_change, scores


def main() -> None:
    run_ablation(__doc__.split("\n")[0], "batch_curvature_ablation.py", [0.003, 0.01], ablate,
                 "Curvature ablation of the linearised replay", "curvature term H Delta")


if __name__ == "__main__":
    run_script(main)
