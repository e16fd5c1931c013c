"""Does replaying an order need each coordinate's own Adam second moment? An ablation of the linearised replay.

Projected replays (k << d) cannot apply Adam's coordinate-wise division m_i / sqrt(v_i); this script asks whether
anything they could apply would do. It replays the digits task's retrained orders with the linearised replay
(``lpl.order.linearized``, in float64 torch ops: gradients g_b(theta_s) + H_s Delta_s, each order's own moments)
and swaps only the second moment v for what a projected replay could carry:

- group-averaged v (one value per group, as optimizers such as Adam-mini keep): per output row of each weight
  matrix, random groups of 4 / 16 / 64 / 256 coordinates, one group. A projection of each group's gradient keeps its
  norm, so such a v is computable from projections; the update is then linear in m within a group.
- an order-independent v (the update becomes linear in the gradients, so fully projectable): the reference run's
  own v, or the v of the pool-average squared gradient at each reference step.

Every variant replays the reference order to itself (its reference directions use the same rule). Scores:
Spearman and mean absolute error of the estimated vs retrained final validation loss, against "no change". Reuses
``benchmarks/order_estimation.py``'s task, recordings (``--workdir``) and orders.

Usage::

    python benchmarks/second_moment_ablation.py --out benchmarks/results/second_moment_ablation.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

import order_estimation as bench  # noqa: E402
from lpl.order import Recording, retrain  # noqa: E402
from lpl.order.adjoint import record_sensitivities  # noqa: E402
from lpl.order.linearized import LinearizedRun, linearized_from_tensors  # noqa: E402
from lpl.utils.cli_args import output_dir, output_file, positive_float, positive_int  # noqa: E402
from lpl.utils.errors import run_script  # noqa: E402
from lpl.utils.io import atomic_write_text  # noqa: E402

HESSIAN_RANK, VAL_CURVATURE_RANK = 16, 8  # as order_estimation.py's linearized rows


def row_groups(shapes: list[torch.Size]) -> Tensor:
    """A group id per parameter coordinate (flattened in parameter order): one per output row of each matrix, one
    per other tensor."""
    ids, first = [], 0
    for shape in shapes:
        rows = shape[0] if len(shape) >= 2 else 1
        ids.append(torch.arange(rows).repeat_interleave(shape.numel() // rows) + first)
        first += rows
    return torch.cat(ids)


def random_groups(d: int, size: int, seed: int = 0) -> Tensor:
    permutation = torch.randperm(d, generator=torch.Generator().manual_seed(seed))
    ids = torch.empty(d, dtype=torch.long)
    ids[permutation] = torch.arange(d) // size
    return ids


def group_mean(x: Tensor, groups: Tensor | None) -> Tensor:
    """Each row of ``x`` [n, d] with every coordinate replaced by its group's mean (``groups`` None: unchanged)."""
    if groups is None:
        return x
    count = int(groups.max()) + 1
    sums = x.new_zeros(x.shape[0], count).index_add_(1, groups, x)
    return (sums / torch.bincount(groups, minlength=count).to(x.dtype))[:, groups]


class Replay:
    """The linearised replay in float64 torch ops, with the second moment as a variant chooses it."""

    def __init__(self, run: LinearizedRun, reference: Tensor) -> None:
        if run.decoupled is False or bool(torch.as_tensor(run.weight_decay).ne(0).any()):
            raise SystemExit("this ablation replays Adam without weight decay (the digits task)")
        self.run, self.reference = run, reference
        self.grads = run.pool_grads.double()
        self.steps = run.num_steps

    def _bias(self, s: int) -> tuple[float, float]:
        beta1, beta2 = self.run.betas
        return 1.0 - beta1 ** (s + 1), 1.0 - beta2 ** (s + 1)

    def _curvature(self, s: int, delta: Tensor) -> Tensor:
        vectors, values = self.run.hessian_vectors[s].double(), self.run.hessian_values[s].double()
        return ((delta @ vectors.T) * values) @ vectors

    def _final_loss(self, delta: Tensor) -> np.ndarray:
        run = self.run
        coords = delta @ run.val_directions.double().T
        loss = run.val_losses[-1].double() + delta @ run.val_grads[-1].double()
        return (loss + 0.5 * (coords * coords * run.val_curvature.double()).sum(-1)).numpy()

    def own_moments(self, orders: Tensor, groups: Tensor | None) -> np.ndarray:
        """Each order's own m and v (v group-averaged when ``groups`` is given), as Adam runs."""
        beta1, beta2 = self.run.betas
        reference_steps = self._directions(self.grads[torch.arange(self.steps), self.reference][:, None], groups)
        delta, m, v = (self.grads.new_zeros(orders.shape[0], self.grads.shape[-1]) for _ in range(3))
        for s in range(self.steps):
            g = self.grads[s].index_select(0, orders[:, s]) + self._curvature(s, delta)
            m = beta1 * m + (1 - beta1) * g
            v = beta2 * v + (1 - beta2) * group_mean(g * g, groups)
            bc1, bc2 = self._bias(s)
            delta = delta - float(self.run.lr[s]) * ((m / bc1) / ((v / bc2).sqrt() + self.run.eps) - reference_steps[s])
        return self._final_loss(delta)

    def _directions(self, grads: Tensor, groups: Tensor | None) -> Tensor:
        """Adam's m_hat / (sqrt(v_hat) + eps) at each step for the gradients ``grads`` [T, 1, d] (the reference's:
        its Delta stays 0 under the same rule, so no curvature term)."""
        beta1, beta2 = self.run.betas
        m = v = grads.new_zeros(grads.shape[1:])
        out = []
        for s in range(self.steps):
            m = beta1 * m + (1 - beta1) * grads[s]
            v = beta2 * v + (1 - beta2) * group_mean(grads[s] * grads[s], groups)
            bc1, bc2 = self._bias(s)
            out.append(((m / bc1) / ((v / bc2).sqrt() + self.run.eps))[0])
        return torch.stack(out)

    def fixed_moment(self, orders: Tensor, squares: Tensor) -> np.ndarray:
        """An order-independent v (the EMA of ``squares`` [T, d]): Delta is then linear in the gradient changes."""
        beta1, beta2 = self.run.betas
        v = torch.zeros(self.grads.shape[-1], dtype=torch.float64)
        delta = self.grads.new_zeros(orders.shape[0], self.grads.shape[-1])
        momentum = torch.zeros_like(delta)
        for s in range(self.steps):
            g = self.grads[s].index_select(0, orders[:, s]) - self.grads[s, self.reference[s]]
            momentum = beta1 * momentum + (1 - beta1) * (g + self._curvature(s, delta))
            v = beta2 * v + (1 - beta2) * squares[s]
            bc1, bc2 = self._bias(s)
            delta = delta - float(self.run.lr[s]) * (momentum / bc1) / ((v / bc2).sqrt() + self.run.eps)
        return self._final_loss(delta)

    def variants(self, orders: Tensor, shapes: list[torch.Size]) -> dict[str, np.ndarray]:
        d = self.grads.shape[-1]
        out = {"own v per coordinate (= method linearized)": self.own_moments(orders, None),
               "v averaged per matrix row": self.own_moments(orders, row_groups(shapes))}
        for size in (4, 16, 64, 256):
            out[f"v averaged in random groups of {size}"] = self.own_moments(orders, random_groups(d, size))
        out["one v for all coordinates"] = self.own_moments(orders, torch.zeros(d, dtype=torch.long))
        steps = torch.arange(self.steps)
        out["fixed v: the reference run's"] = self.fixed_moment(orders, self.grads[steps, self.reference] ** 2)
        out["fixed v: pool-average squared gradient"] = self.fixed_moment(orders, (self.grads[:-1] ** 2).mean(1))
        return out


def digits_task(lr: float, args) -> tuple[Recording, LinearizedRun, Tensor, np.ndarray, float]:
    """The digits task recorded at ``lr`` with its linearised replay's data, the orders, their retrained final
    losses and the "no change" mean absolute error (recordings reused from ``args.workdir``)."""
    path = args.workdir / f"digits_lr{lr}_T{args.steps}_kexact_r2_v{VAL_CURVATURE_RANK}"
    bench.record(path, "digits", lr, args.steps, None, 2, True, VAL_CURVATURE_RANK)
    built = Recording.open(path).manifest.get("sensitivity")
    if built is None or built.get("hessian_rank", 0) != HESSIAN_RANK:
        record_sensitivities(path, curvature_rank=VAL_CURVATURE_RANK, hessian_rank=HESSIAN_RANK, accelerator="cpu",
                             verbose=False)
    recording = Recording.open(path)
    tables, info = recording.sensitivity()
    run = linearized_from_tensors(tables, info.get("linearized", {}))
    _, orders = bench.make_orders(path, args.orders, seed=1234)
    truth = np.array([retrain(recording, order.tolist(), accelerator="cpu").final_loss for order in orders])
    no_change = float(np.abs(truth - recording.probe_scalars["val_loss"][-1]).mean())
    return recording, run, orders, truth, no_change


def ablate(lr: float, args) -> tuple[float, dict[str, dict[str, float]]]:
    recording, run, orders, truth, no_change = digits_task(lr, args)
    model, _ = bench.build_task("digits", lr, args.steps)
    replay = Replay(run, torch.tensor(recording.order))
    scores = {name: bench.metrics(estimate, truth)
              for name, estimate in replay.variants(orders, [p.shape for p in model.parameters()]).items()}
    print(f"[lr={lr}] no-change MAE {no_change:.4f}; " + "; ".join(
        f"{name}: {s['spearman']:.2f} / {s['mae'] / no_change:.2f}x" for name, s in scores.items()), flush=True)
    return no_change, scores


def ablation_report(title: str, column: str, results: dict[float, tuple[float, dict]], command: str,
                    orders: int) -> str:
    """The markdown table of an ablation: a row per variant ``column``, Spearman / MAE vs "no change" per lr."""
    lrs = list(results)
    lines = [f"# {title} (digits, {orders} random + reversed + easy-first orders, each retrained)", "",
             f"`{command}`", "", "Spearman / MAE as a multiple of \"no change\" at each learning rate:", "",
             f"| {column} | " + " | ".join(f"lr {lr}" for lr in lrs) + " |",
             "|---" * (len(lrs) + 1) + "|",
             "| no change (MAE) | " + " | ".join(f"{results[lr][0]:.4f}" for lr in lrs) + " |"]
    for name in results[lrs[0]][1]:
        cells = []
        for lr in lrs:
            no_change, scores = results[lr]
            cells.append(f"{scores[name]['spearman']:.2f} / {scores[name]['mae'] / no_change:.2f}x")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_ablation(description: str, script: str, default_lrs: list[float],
                 ablate_at: Callable[[float, argparse.Namespace], tuple[float, dict]], title: str,
                 column: str) -> None:
    """Parse the ablation scripts' shared arguments, ablate at every learning rate, print and write the report."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--lrs", type=lambda text: [positive_float(x) for x in text.split(",")], default=default_lrs)
    parser.add_argument("--steps", type=positive_int, default=24)
    parser.add_argument("--orders", type=positive_int, default=16)
    parser.add_argument("--workdir", type=output_dir, default="/tmp/lpl_order_bench",
                        help="FOLDER for the recordings (shared with order_estimation.py; complete ones are reused)")
    parser.add_argument("--out", type=output_file, default=None, help="markdown FILE (default: print only)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = {lr: ablate_at(lr, args) for lr in args.lrs}
    text = ablation_report(title, column, results, f"python benchmarks/{script} " + " ".join(sys.argv[1:]),
                           args.orders)
    print(text)
    if args.out is not None:
        atomic_write_text(args.out, text)
        print(f"written {args.out}")


def main() -> None:
    run_ablation(__doc__.split("\n")[0], "second_moment_ablation.py", [0.001, 0.003, 0.01], ablate,
                 "Second-moment ablation of the linearised replay", "v in the replay")


if __name__ == "__main__":
    run_script(main)
