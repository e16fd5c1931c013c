"""Batch samplers whose order is reproducible, resumable mid-epoch, and DDP-aware.

Training-order tools need to know, and to repeat, exactly which samples formed each optimizer step. Both samplers
here yield *global* batches of sample ids split across ranks: under DDP with world size W, rank r yields the r-th
contiguous slice of every global batch, so the union over ranks of step t is the same batch whatever W is.
Lightning restores a sampler's position on resume only when it has ``state_dict``/``load_state_dict``; both do.
Use them with ``Trainer(use_distributed_sampler=False)`` (the example configs do).

The position a sampler reports counts the batches it has *yielded*; with DataLoader workers that runs ahead of the
batches trained (prefetching), so a checkpoint taken mid-epoch would resume a few batches late. ``TrainOrderRecorder``
rewrites the saved position from Lightning's own count of trained batches (``batch_progress``).

Attached to a fitting Trainer (``sampler.trainer``, set by the DataModules), a sampler trains the Trainer's current
epoch: Lightning calls ``set_epoch`` on a loader's sampler but never on its batch sampler, and a loader rebuilt every
epoch (``reload_dataloaders_every_n_epochs``) brings a new sampler that would otherwise start at epoch 0 again.
"""

from __future__ import annotations

import hashlib
import numbers
from collections.abc import Iterable
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import Sampler

from lpl.utils.errors import LplError, checked_count
from lpl.utils.trainer import rank_and_world


def _rank_slice(batch: Sequence[int], rank: int, world: int) -> list[int]:
    share = len(batch) // world
    return list(batch[rank * share : (rank + 1) * share])


def _check_splittable(batches: list[list[int]], world: int, epoch: int, short_last_hint: str) -> None:
    """Refuse, before the epoch's first step, a global batch the data-parallel processes cannot share evenly."""
    uneven = [(position, len(batch)) for position, batch in enumerate(batches) if len(batch) % world]
    if not uneven:
        return
    position, size = uneven[0]
    hint = (f"it is the epoch's short last batch: {short_last_hint}"
            if position == len(batches) - 1 and size < len(batches[0])
            else "choose batch sizes divisible by the number of devices")
    raise LplError(f"batch {position} of epoch {epoch} holds {size} samples, which cannot be split evenly over {world} "
                   f"data-parallel processes; {hint}.")


class _ResumableBatchSampler(Sampler[list[int]]):
    """Shared mechanics: position tracking, state_dict, rank slicing. Subclasses define ``global_batches``.

    ``trainer``: the Trainer it feeds (the DataModules set it), whose data-parallel rank and size pick the slice;
    without one, torch.distributed's. A one-device Trainer run after a DDP fit in the same process (Lightning leaves the
    process group initialised) then still trains whole batches."""

    trainer: Any = None
    short_last_hint = "give it a size the processes can share"  # _check_splittable's advice; subclasses say more

    def __init__(self) -> None:
        self.epoch = 0
        self._consumed = 0  # batches of the current epoch already yielded (for mid-epoch resume)
        self._restored = False  # the position came from load_state_dict: the next pass continues there

    def global_batches(self, epoch: int) -> list[list[int]]:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        # Lightning stops drawing after the epoch's last batch, so the generator below may never finish: a new
        # epoch must start from its first batch (a restored mid-epoch position keeps its own epoch number).
        if epoch != self.epoch:
            self._consumed = 0
        self.epoch = epoch

    def _fitting_epoch(self) -> int | None:
        """The epoch the attached Trainer is fitting; None without a Trainer or outside its fit (a loader built
        after training ends starts at epoch 0, as without a Trainer)."""
        state = getattr(self.trainer, "state", None)
        if state is None or state.fn != "fit" or getattr(state, "status", None) != "running":
            return None
        return int(self.trainer.current_epoch)

    def __len__(self) -> int:
        epoch = self._fitting_epoch()
        return len(self.global_batches(self.epoch if epoch is None or self._restored else epoch))

    def __iter__(self) -> Iterator[list[int]]:
        rank, world = self._rank_and_world()
        fitting_epoch = self._fitting_epoch()
        if self._restored:  # a checkpoint's position (load_state_dict): this pass continues there
            self._restored = False
        elif fitting_epoch is not None:
            # a pass in a fit trains the Trainer's epoch from its first batch: a loader rebuilt for a new epoch
            # continues the run, and a pass Lightning began only to prefetch, then began again, repeats no batch
            self.epoch, self._consumed = fitting_epoch, 0
        elif self._consumed:
            # the last pass was abandoned (Lightning stops after the epoch's last batch, or earlier under
            # limit_train_batches, without exhausting us): this pass is the next epoch, from its first batch
            self.epoch, self._consumed = self.epoch + 1, 0
        batches = self.global_batches(self.epoch)
        if world > 1:
            _check_splittable(batches, world, self.epoch, self.short_last_hint)
        start, self._consumed = self._consumed, 0
        for position in range(start, len(batches)):
            self._consumed = position + 1
            yield _rank_slice(batches[position], rank, world)
        self._consumed = 0
        self.epoch += 1

    def _rank_and_world(self) -> tuple[int, int]:
        """This process's data-parallel rank and the number of data-parallel processes (Lightning's sampler
        arguments: under tensor parallelism fewer than the processes, since a model-parallel group shares its data)."""
        if self.trainer is None:
            return rank_and_world()
        kwargs = self.trainer.distributed_sampler_kwargs
        return (int(kwargs["rank"]), int(kwargs["num_replicas"])) if kwargs else (0, 1)

    def plan_digest(self, epoch: int, consumed: int) -> str:
        """sha256 of the first ``consumed`` global batches of ``epoch``: a saved position continues the epoch only
        where this plan trained the same batches before it."""
        batches = self.global_batches(epoch)[:consumed]
        sizes = torch.tensor([len(batch) for batch in batches], dtype=torch.int64)
        ids = torch.tensor([i for batch in batches for i in batch], dtype=torch.int64)
        return hashlib.sha256(sizes.numpy().tobytes() + b"|" + ids.numpy().tobytes()).hexdigest()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed": self._consumed, "plan": self.plan_digest(self.epoch, self._consumed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        epoch, consumed = int(state["epoch"]), int(state["consumed"])
        if epoch < 0 or not 0 <= consumed <= len(self.global_batches(epoch)):
            raise LplError(f"the saved loader position (epoch {epoch}, {consumed} batches) is not one of this "
                           f"sampler's ({len(self.global_batches(epoch))} batches an epoch): the checkpoint is from "
                           "another dataset or batch size.")
        # a position saved before the digest existed is taken as it is
        if "plan" in state and state["plan"] != self.plan_digest(epoch, consumed):
            raise LplError(
                f"the checkpoint trained other batches in the first {consumed} steps of epoch {epoch} than this data "
                "now plans there: the dataset (files added or removed), batch_size, seed or order changed since it "
                "was saved, so continuing the epoch would train some samples twice and skip others. Resume with the "
                "data and options it was saved with, or from a checkpoint taken at the end of an epoch.")
        self.epoch, self._consumed = epoch, consumed
        self._restored = True


class SeededBatchSampler(_ResumableBatchSampler):
    """Shuffles ``range(num_samples)`` each epoch with ``seed + epoch`` and cuts it into global batches.

    Example::

        sampler = SeededBatchSampler(num_samples=4000, batch_size=64, seed=0)
        loader = DataLoader(dataset, batch_sampler=sampler)
    """

    short_last_hint = "drop it (drop_last=True), or choose a number of samples that splits evenly"

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, drop_last: bool = True) -> None:
        super().__init__()
        if isinstance(num_samples, Sampler):  # Lightning re-creating it around a DistributedSampler
            raise LplError(
                f"SeededBatchSampler takes num_samples (an int), got a {type(num_samples).__name__}: under DDP the lpl "
                "samplers split each batch across processes themselves; run with Trainer(use_distributed_sampler="
                "False).")
        num_samples = checked_count("num_samples", num_samples, 1)
        batch_size = checked_count("batch_size", batch_size, 1)
        if drop_last and batch_size > num_samples:
            raise LplError(f"batch_size {batch_size} is larger than the {num_samples} training samples.")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = checked_count("seed", seed, 0)
        self.drop_last = drop_last

    def global_batches(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        ids = torch.randperm(self.num_samples, generator=generator).tolist()
        stop = len(ids) - len(ids) % self.batch_size if self.drop_last else len(ids)
        return [ids[i : i + self.batch_size] for i in range(0, stop, self.batch_size)]


def _as_list(values: Any, what: str) -> list[Any]:
    """A sequence, numpy array or tensor as a list of its entries (an array's rows become lists)."""
    if hasattr(values, "tolist") and hasattr(values, "ndim"):
        if values.ndim == 0:
            raise LplError(f"{what} must be a list, got the single number {values.tolist()!r}.")
        return values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise LplError(f"{what} must be a list, got {values!r}.")
    return list(values)


def whole_numbers(values: Any, what: str) -> list[int]:
    """``values`` (a list, numpy array or tensor) as ints; floats (1.7 read as 1), bools and negative ids are
    refused."""
    values = [v.item() if hasattr(v, "ndim") and v.ndim == 0 else v for v in _as_list(values, what)]
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0]
    if bad:
        raise LplError(f"{what} must be whole numbers from 0, got {bad[0]!r}.")
    return [int(v) for v in values]


def _is_list(entry: Any) -> bool:
    return (isinstance(entry, Iterable) and not isinstance(entry, (str, bytes))
            and not (hasattr(entry, "ndim") and entry.ndim == 0))


class OrderedBatchSampler(_ResumableBatchSampler):
    """Yields ``batches[order[0]], batches[order[1]], ...``: one epoch is one pass over ``order``.

    ``batches`` is the pool (lists of sample ids); ``order`` is any sequence of pool positions (a permutation, or
    repeats and omissions); ``None`` means the pool order. A list of such sequences is an order per epoch: epoch k
    yields ``order[k]`` (after the last, the epochs repeat, as a single order does), so a run cut into epochs is
    replayed in the same epochs (``current_epoch`` and the epoch hooks as they were). Lightning reads a loader's
    ``len()`` when it builds it: an epoch longer than the first is cut there unless the loader is rebuilt every epoch
    (``reload_dataloaders_every_n_epochs=1``); shorter ones end early.

    Example::

        sampler = OrderedBatchSampler(batches=[[0, 1], [2, 3], [4, 5]], order=[2, 0, 1])
        assert list(sampler) == [[4, 5], [0, 1], [2, 3]]
        per_epoch = OrderedBatchSampler(batches=[[0, 1], [2, 3], [4, 5]], order=[[2, 0], [1]])
        assert list(per_epoch) == [[4, 5], [0, 1]] and list(per_epoch) == [[2, 3]]
    """

    short_last_hint = "leave it out of `order` (or `batches`), or give it a size the processes can share"

    def __init__(
        self, batches: Sequence[Sequence[int]], order: Sequence[int] | Sequence[Sequence[int]] | None = None
    ) -> None:
        super().__init__()
        batches = _as_list(batches, "batches")
        if len(batches) == 0:
            raise LplError("OrderedBatchSampler needs at least one batch in `batches`.")
        if not all(_is_list(batch) for batch in batches):
            raise LplError(f"batches must be a list of batches, each a list of sample ids (e.g. [[0, 1], [2, 3]]); "
                           f"got {batches[0]!r} as its first batch.")
        self.batches = [whole_numbers(batch, "a batch's sample ids") for batch in batches]
        if any(len(batch) == 0 for batch in self.batches):
            raise LplError("every batch in `batches` must hold at least one sample id.")
        order = list(range(len(self.batches))) if order is None else _as_list(order, "order")
        if not order:
            raise LplError("order lists no batch: an epoch would train nothing; give at least one position in "
                           "`batches` (None means the pool order).")
        lists = [_is_list(entry) for entry in order]
        self.per_epoch = all(lists)  # order[k] is epoch k's order
        if any(lists) and not self.per_epoch:
            raise LplError("order mixes batch positions and lists of them; give one list of positions, or one list "
                           "per epoch.")
        if self.per_epoch:
            self.order: list[int] | list[list[int]] = [whole_numbers(epoch, "order") for epoch in order]
            empty = [k for k, epoch in enumerate(self.order) if not epoch]
            if empty:
                raise LplError(f"epoch {empty[0]} of the per-epoch order lists no batch; every epoch needs one.")
        else:
            self.order = whole_numbers(order, "order")
        named = [i for epoch in self.order for i in epoch] if self.per_epoch else self.order
        bad = [i for i in named if not 0 <= i < len(self.batches)]
        if bad:
            raise LplError(
                f"order names batch {bad[0]}, but the pool has batches 0..{len(self.batches) - 1}; "
                "an order lists positions in `batches`."
            )

    def global_batches(self, epoch: int) -> list[list[int]]:
        order = self.order[epoch % len(self.order)] if self.per_epoch else self.order
        return [self.batches[i] for i in order]
