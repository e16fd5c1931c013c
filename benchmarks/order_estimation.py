"""Order estimation against true retraining: accuracy per method, projection size and drift; speed; curriculum; map.

For each task and learning rate: record a reference run of T steps with TrainOrderRecorder at every proj_dim (and in
full space for small models), truly retrain 16 random orders plus the reversed and the sorted-by-difficulty (easy
first, by each batch's initial loss) orders, and compare every method's estimated final validation loss with the
retrained one (Spearman, Pearson, mean absolute error) against the baseline "no change" (predict the reference loss).
At the medium learning rate it also times estimates against retraining, searches a curriculum (genetic, scored by the
estimator; its best order is retrained and compared with the median random order) and checks the position map on a
sampled subset of (batch, position) pairs against retraining.

The method list is fixed in advance (nothing is tuned on these orders); the curriculum and position checks use
``--select-method`` (default linearized). The full-space methods (``linearized``: ``lpl.order.linearized``;
``adjoint``: ``lpl.order.adjoint``, both built by ``record_sensitivities``) involve no projection: their rows are the
same in every proj_dim section.

CPU note: lpl.order.Projector generates its matrix on the fly, which costs seconds per vector on CPU for these models;
``--materialise`` (default on CPU) gives the recorder a dense Rademacher matrix of the same distribution drawn once
(not bit-identical to Projector's, same JL guarantees). The "exact" column uses the identity (small models only).

Usage::

    python benchmarks/order_estimation.py --tasks digits,lm,vit --quick
    python benchmarks/order_estimation.py --tasks lm --steps 64 --proj-dims 256,1024,4096

The report goes to ``--out`` (a markdown file, with the runs as JSON beside it: same name, ``.json``); by default
``<workdir>/order_estimation.md``, outside the repository: benchmarks/results/order_estimation.md is the hand-written
summary of these runs, never a run's output.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import shutil
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr
from torch import nn
from torch.utils.data import Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lpl.data.base import IndexedDataModule  # noqa: E402
from lpl.order import OrderEstimator, Recording, TrainOrderRecorder, retrain  # noqa: E402
from lpl.order.adjoint import record_sensitivities  # noqa: E402
from lpl.order.linearized import linearized_from_tensors  # noqa: E402
from lpl.order.projection import MatrixProjector  # noqa: E402
from lpl.order.curriculum import search  # noqa: E402
from lpl.order.position import moved, position_map  # noqa: E402
from lpl.order.estimator import replay_data_from_recording  # noqa: E402
from lpl.order.replay import CURVATURE_METHODS, METHODS, PROJECTED_METHODS, ReplayData  # noqa: E402
from lpl.utils.cli_args import comma_separated, non_negative_int, output_dir, output_file, positive_int  # noqa: E402
from lpl.utils.io import atomic_write_json, atomic_write_text  # noqa: E402
from lpl.utils.errors import run_script  # noqa: E402

logging.getLogger("lightning").setLevel(logging.ERROR)
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


# ---------------------------------------------------------------- tasks
class _Digits(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "label": self.y[i], "index": torch.tensor(i)}


class DigitsDataModule(IndexedDataModule):
    """sklearn's 8x8 digits (a small Adam task where the orders' effect is well measured): first 1,437 images train,
    last 360 validate."""

    def __init__(self, batch_size: int = 48, seed: int = 0, batches=None, order=None,
                 eval_batch_size: int = 360) -> None:
        super().__init__(batch_size=batch_size, seed=seed, batches=batches, order=order,
                         eval_batch_size=eval_batch_size)
        self.save_hyperparameters()

    def build_datasets(self):
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
        return _Digits(x[:1437], y[:1437]), _Digits(x[1437:], y[1437:])


class DigitsMLP(L.LightningModule):
    """64-32-10 tanh MLP (2,410 parameters), AdamW at a constant learning rate; ``norm`` adds BatchNorm after the
    hidden layer and ``dropout`` Dropout after its activation (task digits_bn_dropout: layers whose training mode
    matters); ``weight_decay`` decays the weight matrices only, biases in a param group without decay (task
    digits_wd_groups)."""

    def __init__(self, lr: float = 0.003, norm: bool = False, dropout: float = 0.0, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers = [nn.Linear(64, 32)] + ([nn.BatchNorm1d(32)] if norm else []) + [nn.Tanh()]
        self.net = nn.Sequential(*layers, *([nn.Dropout(dropout)] if dropout else []), nn.Linear(32, 10))

    def loss(self, batch):
        return nn.functional.cross_entropy(self.net(batch["image"]), batch["label"])

    def training_step(self, batch, batch_idx):
        return self.loss(batch)

    def configure_optimizers(self):
        if not self.hparams.weight_decay:
            return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.0)
        weights = [p for n, p in self.named_parameters() if n.endswith("weight") and p.ndim > 1]
        others = [p for n, p in self.named_parameters() if not (n.endswith("weight") and p.ndim > 1)]
        return torch.optim.AdamW([{"params": weights}, {"params": others, "weight_decay": 0.0}], lr=self.hparams.lr,
                                 weight_decay=self.hparams.weight_decay)


TASKS = ("digits", "digits_bn_dropout", "digits_wd_groups", "lm", "vit")
SUMMARY = ROOT / "benchmarks" / "results" / "order_estimation.md"  # hand-written: no run may overwrite it


def build_task(name: str, lr: float, steps: int):
    if name == "digits":
        return DigitsMLP(lr=lr), DigitsDataModule()
    if name == "digits_bn_dropout":
        return DigitsMLP(lr=lr, norm=True, dropout=0.1), DigitsDataModule()
    if name == "digits_wd_groups":
        return DigitsMLP(lr=lr, weight_decay=0.5), DigitsDataModule()
    if name == "lm":
        from lpl.data import TextCorpusDataModule
        from lpl.models import CausalLM

        model = CausalLM(vocab_size=256, dim=64, depth=2, num_heads=4, max_seq_len=32, lr=lr, warmup_steps=4)
        return model, TextCorpusDataModule(corpus="lee", seq_len=32, batch_size=16, max_train_samples=16 * steps,
                                           eval_batch_size=128)
    if name == "vit":
        from lpl.data import MNIST5kDataModule
        from lpl.models import ViTClassifier

        model = ViTClassifier("vit_tiny_patch16_224", num_classes=10, img_size=28, patch_size=7, in_chans=1,
                              embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, lr=lr, warmup_steps=0)
        return model, MNIST5kDataModule(batch_size=32, val_size=500, eval_batch_size=500)
    raise SystemExit(f"unknown task {name!r}: choose digits, digits_bn_dropout, digits_wd_groups, lm, vit")


# ---------------------------------------------------------------- recording
class BenchRecorder(TrainOrderRecorder):
    """TrainOrderRecorder with a materialised projection (CPU speed) or none (exact)."""

    def __init__(self, *args, exact: bool = False, materialise: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.exact, self.materialise = exact, materialise

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        if self.exact:
            self._projector = MatrixProjector()
        elif self.materialise:
            d = self._projector.dim_in
            generator = torch.Generator().manual_seed(self.seed)
            signs = torch.randint(0, 2, (self.proj_dim, d), generator=generator).float().mul_(2).sub_(1)
            self._projector = MatrixProjector(signs.div_(math.sqrt(self.proj_dim)))


def num_params(task: str, lr: float, steps: int) -> int:
    model, _ = build_task(task, lr, steps)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def quiet_trainer(steps: int, callbacks: list | None = None, accelerator: str = "cpu") -> L.Trainer:
    """A Trainer for exactly ``steps`` steps of the task's pool, with nothing else (no logger, checkpoints,
    validation or progress bar): how every benchmark run trains."""
    return L.Trainer(max_steps=steps, max_epochs=1, accelerator=accelerator, devices=1, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False,
                     callbacks=callbacks or [])


def warm_up(model: L.LightningModule, datamodule: L.LightningDataModule, steps: int) -> None:
    """``steps`` steps of ordinary training (the model's own optimizer and schedule) on the task's whole train set in
    a seeded shuffle of its own, so that the recorded run starts from trained weights (with a fresh Adam)."""
    hparams = {**datamodule.hparams, "batches": None, "order": None}
    if "max_train_samples" in hparams:  # the LM's pool is a prefix of its corpus: warm up on all of it
        hparams["max_train_samples"] = None
    full = type(datamodule)(**hparams)
    full.setup("fit")
    size, batch = len(full.train_set), int(hparams["batch_size"])
    generator = torch.Generator().manual_seed(1)
    ids = torch.cat([torch.randperm(size, generator=generator) for _ in range(steps * batch // size + 1)])
    warm = type(datamodule)(**{**hparams, "batches": ids[: steps * batch].view(steps, batch).tolist(),
                               "order": list(range(steps))})
    quiet_trainer(steps).fit(model, datamodule=warm)


def record(path: Path, task: str, lr: float, steps: int, proj_dim: int | None, rank: int, materialise: bool,
           val_rank: int, warm_steps: int = 0) -> float | None:
    """Record (or reuse a complete recording), after ``warm_steps`` of warm-up training when > 0; returns the
    recording's wall seconds (None when a complete recording was reused)."""
    if (path / "manifest.json").exists():
        try:
            if Recording.open(path).status == "complete":
                return None
        except Exception:  # noqa: BLE001 - an unreadable leftover is recorded again
            pass
        shutil.rmtree(path)
    L.seed_everything(0, verbose=False)  # the same initial weights for every proj_dim: one reference run
    model, datamodule = build_task(task, lr, steps)
    if warm_steps:
        warm_up(model, datamodule, warm_steps)
    exact = proj_dim is None
    k = sum(p.numel() for p in model.parameters() if p.requires_grad) if exact else proj_dim
    recorder = BenchRecorder(path, proj_dim=k, curvature_rank=rank, val_curvature_rank=val_rank,
                             store_dtype="float32" if exact else "float16",
                             exact=exact, materialise=materialise)
    trainer = quiet_trainer(steps, callbacks=[recorder])
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    return time.perf_counter() - start


# ---------------------------------------------------------------- evaluation
def metrics(estimate: np.ndarray, truth: np.ndarray) -> dict:
    return {"spearman": float(spearmanr(estimate, truth)[0]), "pearson": float(pearsonr(estimate, truth)[0]),
            "mae": float(np.abs(estimate - truth).mean())}


def make_orders(path: Path, num_random: int, seed: int) -> tuple[list[str], torch.Tensor]:
    rec = Recording.open(path)
    reference = torch.tensor(rec.order)
    generator = torch.Generator().manual_seed(seed)
    orders = [reference[torch.randperm(len(reference), generator=generator)] for _ in range(num_random)]
    names = [f"random{i}" for i in range(num_random)]
    initial_loss = rec.step(0, names=["loss"])["loss"][reference]
    orders += [reference.flip(0), reference[initial_loss.argsort()]]
    names += ["reversed", "easy_first"]
    return names, torch.stack(orders)


def project_data(data: ReplayData, proj_dim: int, seed: int = 0) -> ReplayData:
    """Project a full-space recording's vectors with a Rademacher matrix, rounded to float16 as the store keeps
    them: by linearity the same as recording with that projection, at a fraction of the cost."""
    d = data.proj_dim
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randint(0, 2, (proj_dim, d), generator=generator).float().mul_(2).sub_(1).div_(math.sqrt(proj_dim))
    fields = {}
    for name in ("update", "precond_grad", "grad", "val_grad", "curv_basis", "curv_update", "curv_precond",
                 "val_curv_basis"):
        value = getattr(data, name)
        if value is not None:
            fields[name] = (value.float() @ matrix.T).half()
    return dataclasses.replace(data, **fields)


def run(task: str, lr: float, args, workdir: Path, medium: bool) -> dict:
    steps = args.steps
    dims: list[int | None] = list(args.proj_dims)
    derive = args.exact or task.startswith("digits")  # record in full space once, project offline to every proj_dim
    out: dict = {"task": task, "lr": lr, "steps": steps, "num_params": num_params(task, lr, steps), "record_s": {},
                 "warm_start_steps": args.warm_start_steps,
                 "projections": "derived from the full-space recording" if derive else "recorded per proj_dim"}
    paths = {}
    for k in [None] if derive else dims:
        warm = f"_w{args.warm_start_steps}" if args.warm_start_steps else ""
        paths[k] = workdir / (f"{task}_lr{lr}_T{steps}{warm}_k{k or 'exact'}_r{args.curvature_rank}"
                              f"_v{args.val_curvature_rank}")
        seconds = record(paths[k], task, lr, steps, k, args.curvature_rank, args.materialise,
                         args.val_curvature_rank, args.warm_start_steps)
        out["record_s"][str(k or "exact")] = seconds  # None: a complete recording in --workdir was reused
        print(f"[{task} lr={lr}] " + (f"reused the complete recording k={k or 'exact'} in {paths[k]}" if seconds is None
                                      else f"recorded k={k or 'exact'} in {seconds:.0f}s"), flush=True)
    first = next(iter(paths.values()))
    if args.adjoint_rank >= 0:  # one set of full-space data (no projection involved), shared by every proj_dim
        built = Recording.open(first).manifest.get("sensitivity")
        if built is None or built["curvature_rank"] > args.adjoint_rank or (
                built.get("hessian_rank", 0) != args.hessian_rank):
            record_sensitivities(first, curvature_rank=args.adjoint_rank, hessian_rank=args.hessian_rank,
                                 accelerator="cpu", verbose=False)
        tables, info = Recording.open(first).sensitivity()
        linearized = linearized_from_tensors(tables, info.get("linearized", {}))
        out["sensitivity_s"] = info["seconds"]
        print(f"[{task} lr={lr}] sensitivity data in {info['seconds']:.0f}s", flush=True)
    if derive:
        exact = replay_data_from_recording(Recording.open(paths[None]))
        datas = {None: exact, **{k: project_data(exact, k, seed=k) for k in dims}}
        dims = [None] + dims
    else:
        datas = {k: replay_data_from_recording(Recording.open(paths[k])) for k in dims}
    if args.adjoint_rank >= 0:
        datas = {k: dataclasses.replace(d, swap_tables=tables["tables"], swap_curvature=tables["curvature"],
                                        linearized=linearized) for k, d in datas.items()}
    names, orders = make_orders(first, args.orders, seed=1234)
    truth, retrain_s = [], []
    recording = Recording.open(first)  # verified once, not at every retrain
    for order in orders:
        start = time.perf_counter()
        result = retrain(recording, order.tolist(), curve_every_n_steps=steps, accelerator="cpu")
        retrain_s.append(time.perf_counter() - start)
        truth.append(result.final_loss)
    truth = np.array(truth)
    reference = recording.probe_scalars["val_loss"][-1]
    out.update(orders=names, truth=truth.tolist(), reference_loss=reference, retrain_s=float(np.mean(retrain_s)),
               no_change_mae=float(np.abs(truth - reference).mean()), true_spread=float(truth.std()))
    print(f"[{task} lr={lr}] retrained {len(orders)} orders, {out['retrain_s']:.2f}s each; "
          f"no-change MAE {out['no_change_mae']:.4f}", flush=True)
    out["results"] = {}
    for k in dims:
        for method in METHODS:
            if datas[k].weight_decay_per_group and method in PROJECTED_METHODS:
                continue  # they apply one weight decay to every parameter and refuse such a run
            has_cv = datas[k].val_dot_update is not None
            has_quadratic = datas[k].val_curv_basis is not None
            variants = [("", True, True)]
            if has_cv:
                variants.append((" (no control variate)", False, True))
            if has_quadratic:
                variants.append((" (linear loss)", True, False))
            if method in ("adjoint", "linearized"):  # no projection and no control variate in their final loss
                if (datas[k].swap_tables if method == "adjoint" else datas[k].linearized) is None:
                    continue
                variants = [("", True, True)] + ([(" (linear loss)", True, False)] if args.adjoint_rank > 0 else [])
            for suffix, cv, quadratic in variants:
                if method in CURVATURE_METHODS and datas[k].curv_basis is None:
                    continue
                estimator = OrderEstimator(datas[k], method=method, control_variates=cv, quadratic=quadratic)
                estimate = estimator.estimate_many(orders).final_loss.numpy()
                out["results"].setdefault(method + suffix, {})[str(k or "exact")] = metrics(estimate, truth)
    if medium:
        selected = OrderEstimator(datas[dims[-1]], method=args.select_method)
        out.update(extras(task, lr, args, first, selected, orders, truth, retrain_s))
    return out


def extras(task: str, lr: float, args, path: Path, estimator: OrderEstimator, orders: torch.Tensor,
           truth: np.ndarray, retrain_s) -> dict:
    extra: dict = {"extras_proj_dim": estimator.data.proj_dim}
    estimator.estimate_many(orders[:2])  # warm-up
    start = time.perf_counter()
    estimator.estimate(orders[0].tolist())
    single = time.perf_counter() - start
    many = orders[torch.randint(0, len(orders), (1024,), generator=torch.Generator().manual_seed(0))]
    start = time.perf_counter()
    estimator.estimate_many(many)
    batched = (time.perf_counter() - start) / len(many)
    extra["timing"] = {"retrain_s": float(np.mean(retrain_s)), "estimate_s": single, "estimate_batched_s": batched,
                       "speedup_single": float(np.mean(retrain_s)) / single,
                       "speedup_batched": float(np.mean(retrain_s)) / batched}
    print(f"[{task} lr={lr}] timing {extra['timing']}", flush=True)
    # curriculum: search by estimate, retrain the best, compare with the median random order (first args.orders)
    start = time.perf_counter()
    found = search(estimator, budget=args.search_budget, method="genetic", population=64, seed=0)
    search_s = time.perf_counter() - start
    best_truth = retrain(path, found.order, curve_every_n_steps=args.steps, accelerator="cpu").final_loss
    random_truth = truth[: args.orders]
    extra["curriculum"] = {"estimated": found.score, "retrained": best_truth,
                           "random_median": float(np.median(random_truth)), "random_min": float(random_truth.min()),
                           "reference": float(estimator.reference_loss), "search_s": search_s,
                           "evaluations": found.evaluations}
    print(f"[{task} lr={lr}] curriculum {extra['curriculum']}", flush=True)
    # position map on a sampled subset of (batch, position)
    generator = torch.Generator().manual_seed(99)
    reference = estimator.reference_order.cpu()
    nb = len(reference)
    batches = reference[torch.randperm(nb, generator=generator)[: args.map_batches]].tolist()
    positions = sorted(torch.randperm(nb, generator=generator)[: args.map_positions].tolist())
    matrix = position_map(estimator, batches, positions=positions)
    recording = Recording.open(path)  # verified once for every retrained order
    true = torch.tensor([[float(retrain(recording, moved(reference, b, p).tolist(), curve_every_n_steps=args.steps,
                                        accelerator="cpu", batch_losses=True).batch_losses[b])
                          for p in positions] for b in batches])
    centred = lambda m: (m - m.mean(dim=1, keepdim=True)).flatten()  # noqa: E731
    extra["position_map"] = {
        "batches": batches, "positions": positions, "estimated": matrix.tolist(), "retrained": true.tolist(),
        "pearson_raw": float(torch.corrcoef(torch.stack([matrix.flatten(), true.flatten()]))[0, 1]),
        "pearson_within_batch": float(torch.corrcoef(torch.stack([centred(matrix), centred(true)]))[0, 1]),
        "spearman_within_batch": float(spearmanr(centred(matrix).numpy(), centred(true).numpy())[0]),
    }
    print(f"[{task} lr={lr}] position map within-batch pearson {extra['position_map']['pearson_within_batch']:.3f}",
          flush=True)
    return extra


# ---------------------------------------------------------------- report
def report(runs: list[dict], args, command: str) -> str:
    lines = ["# Order estimation vs true retraining", "", f"Command: `{command}`", "",
             "Each cell: Spearman / Pearson / MAE of the estimated vs retrained final validation loss over "
             f"{args.orders} random + reversed + easy-first orders (each truly retrained). Methods are fixed in "
             "advance; nothing is tuned on these orders. `exact` = full-space quantities (identity projection).", ""]
    for task in dict.fromkeys(r["task"] for r in runs):
        task_runs = [r for r in runs if r["task"] == task]
        first = task_runs[0]
        warm = (f", recorded after {first['warm_start_steps']} warm-up steps" if first.get("warm_start_steps")
                else ", recorded from initialisation")
        lines += [f"## {task} ({first['num_params']:,} parameters, T = {first['steps']} steps, pool = {first['steps']} "
                  f"batches{warm}; projections {first['projections']})", ""]
        lines += ["| lr | reference loss | true spread (std) | no-change MAE | retrain s/order | record s per k | "
                  "sensitivity data s |", "|---|---|---|---|---|---|---|"]
        for r in task_runs:
            rec = ", ".join(f"{k}: " + ("reused" if v is None else f"{v:.0f}") for k, v in r["record_s"].items())
            lines.append(f"| {r['lr']} | {r['reference_loss']:.4f} | {r['true_spread']:.4f} | {r['no_change_mae']:.4f} "
                         f"| {r['retrain_s']:.2f} | {rec} | {r.get('sensitivity_s', float('nan')):.0f} |")
        lines.append("")
        dims = list(next(iter(first["results"].values())).keys())
        for k in dims:
            lines += [f"### proj_dim = {k}", "", "| method | " + " | ".join(f"lr {r['lr']}" for r in task_runs) + " |",
                      "|---|" + "---|" * len(task_runs)]
            lines.append("| no change (MAE) | "
                         + " | ".join(f"- / - / {r['no_change_mae']:.4f}" for r in task_runs) + " |")
            for method in first["results"]:
                cells = []
                for r in task_runs:
                    m = r["results"].get(method, {}).get(k)
                    cells.append("n/a" if m is None else f"{m['spearman']:.2f} / {m['pearson']:.2f} / {m['mae']:.4f}")
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
            lines.append("")
        for r in task_runs:
            if "timing" in r:
                t = r["timing"]
                lines += [f"Speed (lr {r['lr']}, method {args.select_method}, proj_dim {r['extras_proj_dim']}): "
                          f"retrain {t['retrain_s']:.2f} s/order; "
                          f"estimate {t['estimate_s'] * 1e3:.1f} ms for one order ({t['speedup_single']:.0f}x), "
                          f"{t['estimate_batched_s'] * 1e3:.2f} ms/order batched over 1,024 orders "
                          f"({t['speedup_batched']:.0f}x).", ""]
                c = r["curriculum"]
                verdict = "beats" if c["retrained"] < c["random_median"] else "does NOT beat"
                lines += [f"Curriculum (genetic, {c['evaluations']} estimated orders, {c['search_s']:.1f} s): "
                          f"best order estimated {c['estimated']:.4f}, retrained {c['retrained']:.4f}: {verdict} "
                          f"the median random order ({c['random_median']:.4f}; best random {c['random_min']:.4f}; "
                          f"reference {c['reference']:.4f}).", ""]
                p = r["position_map"]
                lines += [f"Position map ({len(p['batches'])} batches x {len(p['positions'])} positions, "
                          f"each retrained): Pearson {p['pearson_raw']:.2f} raw, "
                          f"{p['pearson_within_batch']:.2f} within batch "
                          f"(row means removed; Spearman {p['spearman_within_batch']:.2f}).", ""]
    return "\n".join(lines) + "\n"


def lr_table(text: str) -> dict[str, list[float]]:
    """An argparse ``type`` for --lrs: 'task=lr:lr:lr,task=lr' -> {task: [lr, ...]}."""
    table = {}
    for item in text.split(","):
        name, sep, values = item.partition("=")
        name = name.strip()
        if not sep or not values:
            raise argparse.ArgumentTypeError(f"{item!r} is not TASK=LR[:LR...] (e.g. digits=0.001:0.003:0.01).")
        if name not in TASKS:
            raise argparse.ArgumentTypeError(f"unknown task {name!r} in {item!r}: choose from {', '.join(TASKS)}.")
        try:
            lrs = [float(v) for v in values.split(":")]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{item!r}: the learning rates must be numbers separated by ':'."
            ) from None
        if not all(lr > 0 and math.isfinite(lr) for lr in lrs):
            raise argparse.ArgumentTypeError(f"{item!r}: learning rates must be positive.")
        table[name] = lrs
    return table


def dim_list(text: str) -> list[int]:
    """An argparse ``type`` for --proj-dims: comma-separated positive whole numbers."""
    try:
        return [positive_int(k) for k in text.split(",")]
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated projection sizes, each {error}") from None


def report_file(text: str) -> Path:
    """An argparse ``type`` for --out: an output file (``output_file``) other than the hand-written summary
    benchmarks/results/order_estimation.md."""
    path = output_file(text)
    if path.resolve() == SUMMARY.resolve():
        raise argparse.ArgumentTypeError(f"{text!r} is the hand-written summary; write the run elsewhere "
                                         "(e.g. benchmarks/results/order_estimation_<name>.md).")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=comma_separated(TASKS, "task"), default="digits,lm,vit",
                        help=f"comma-separated, from: {', '.join(TASKS)}")
    parser.add_argument("--steps", type=positive_int, default=64)
    parser.add_argument("--lrs", type=lr_table, default=None,
                        help="per task: 'digits=0.001:0.003:0.01,lm=...'; medium = middle")
    parser.add_argument("--proj-dims", type=dim_list, default="256,1024,4096")
    parser.add_argument("--exact", action="store_true", help="also the full-space column (small models only)")
    parser.add_argument("--orders", type=positive_int, default=16)
    parser.add_argument("--warm-start-steps", type=non_negative_int, default=0,
                        help="train this many steps (own shuffle of the whole train set) before the recorded run, "
                             "which then starts from trained weights with a fresh Adam (0: from initialisation)")
    parser.add_argument("--curvature-rank", type=non_negative_int, default=2)
    parser.add_argument("--val-curvature-rank", type=non_negative_int, default=8,
                        help="top validation curvature directions recorded at the end (0: none)")
    parser.add_argument("--adjoint-rank", type=int, default=8,
                        help="validation-curvature directions of the full-space sensitivity data (-1: do not build "
                             "them)")
    parser.add_argument("--hessian-rank", type=non_negative_int, default=16,
                        help="eigenpairs of each reference batch's Hessian for method linearized (0: none)")
    parser.add_argument("--select-method", default="linearized", choices=METHODS)
    parser.add_argument("--search-budget", type=positive_int, default=2048)
    parser.add_argument("--map-batches", type=positive_int, default=3)
    parser.add_argument("--map-positions", type=positive_int, default=4)
    parser.add_argument("--materialise", action=argparse.BooleanOptionalAction, default=not torch.cuda.is_available())
    parser.add_argument("--quick", action="store_true", help="T = 24, proj_dims 256,1024, 8 random orders")
    parser.add_argument("--workdir", type=output_dir, default="/tmp/lpl_order_bench",
                        help="FOLDER for the recordings (a complete one found there is reused); default: "
                             "/tmp/lpl_order_bench")
    parser.add_argument("--out", type=report_file, default=None,
                        help="output FILE (markdown; the runs also go to the same name with .json); default: "
                             "<workdir>/order_estimation.md (never benchmarks/results/order_estimation.md, the "
                             "hand-written summary)")
    args = parser.parse_args()
    if args.adjoint_rank < -1:
        parser.error(f"--adjoint-rank: must be -1 (do not build) or at least 0, got {args.adjoint_rank}")
    if args.quick:
        args.steps, args.proj_dims, args.orders, args.search_budget = 24, [256, 1024], 8, 1024
    if args.out is None:
        args.out = args.workdir / "order_estimation.md"
    torch.set_num_threads(2)
    lrs = {"digits": [0.001, 0.003, 0.01], "digits_bn_dropout": [0.001, 0.003, 0.01],
           "digits_wd_groups": [0.001, 0.003, 0.01], "lm": [0.001, 0.003, 0.01], "vit": [0.0003, 0.001, 0.003]}
    lrs.update(args.lrs or {})
    workdir = args.workdir
    try:  # both folders exist before any recording, so results cannot be lost at the end
        workdir.mkdir(parents=True, exist_ok=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"cannot create {error.filename!r}: {error.strerror or error}")
    runs = []
    command = "python benchmarks/order_estimation.py " + " ".join(sys.argv[1:])
    for task in args.tasks:
        for i, lr in enumerate(lrs[task]):
            runs.append(run(task, lr, args, workdir, medium=i == len(lrs[task]) // 2))
            atomic_write_json(args.out.with_suffix(".json"), runs)
            atomic_write_text(args.out, report(runs, args, command))
    print(args.out.read_text())
    print(f"written {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    run_script(main)
