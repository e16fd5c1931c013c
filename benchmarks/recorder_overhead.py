"""TrainOrderRecorder overhead, measured side by side in one process on the demo LM and ViT.

For each model: the time of a training step without the recorder and with it in "recording only" mode (probes only
at t = 0 and t = T, which are excluded from the step times), interleaved over repeats; then one run that probes every
``--probe-every`` steps, for the cost of a probe step (all T pool batches + validation) and the bytes it stores:
with the pool batches' rows projected together, as the recorder does, and with one batch per projection pass.

    python benchmarks/recorder_overhead.py --steps 25 --repeats 3 --proj-dim 1024 --out benchmarks/results/recorder_overhead_cpu.md
"""  # noqa: E501

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from lpl.data import MNIST5kDataModule, TextCorpusDataModule
from lpl.models import CausalLM, ViTClassifier
from lpl.order import Recording, TrainOrderRecorder, quantities
from lpl.utils.errors import run_script
from lpl.utils.cli_args import output_file
from lpl.utils.io import atomic_write_text


class StepTimer(L.Callback):
    """Wall time from one step's start to the next (so it includes every callback's work for that step)."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == trainer.max_steps:
            self.starts.append(time.perf_counter())

    def step_times(self, skip: set[int]) -> list[float]:
        return [b - a for t, (a, b) in enumerate(zip(self.starts, self.starts[1:])) if t not in skip]


class TimedRecorder(TrainOrderRecorder):
    """Times its probes and, separately, its per-step work outside probes (a direct, load-robust overhead figure)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.probe_seconds: list[float] = []
        self.hook_seconds: list[float] = []

    def _probe(self, trainer, pl_module, step) -> None:
        start = time.perf_counter()
        super()._probe(trainer, pl_module, step)
        self.probe_seconds.append(time.perf_counter() - start)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        start, probes = time.perf_counter(), sum(self.probe_seconds)
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self.hook_seconds.append(time.perf_counter() - start - (sum(self.probe_seconds) - probes))


def _quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q * 100) - 1]


def demo(name: str):
    if name == "lm":
        model = CausalLM(vocab_size=256, dim=64, depth=2, num_heads=4, max_seq_len=64, warmup_steps=2)
        return model, TextCorpusDataModule(seq_len=64, batch_size=16)
    model = ViTClassifier("vit_tiny_patch16_224", num_classes=10, img_size=28, patch_size=7, in_chans=1,
                          embed_dim=64, depth=2, num_heads=4)
    return model, MNIST5kDataModule(batch_size=64)


def fit(name: str, steps: int, callbacks: list) -> L.LightningModule:
    L.seed_everything(0, verbose=False)
    model, datamodule = demo(name)
    trainer = L.Trainer(
        accelerator="auto", devices=1, max_steps=steps, callbacks=callbacks, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )
    trainer.fit(model, datamodule=datamodule)
    return model


def measure(name: str, args: argparse.Namespace, workdir: Path) -> dict:
    base, recording, hooks = [], [], []
    for repeat in range(args.repeats):  # interleaved so drifting machine load hits both alike
        timer = StepTimer()
        fit(name, args.steps, [timer])
        base += timer.step_times(skip={0})
        timer = StepTimer()
        recorder = TimedRecorder(workdir / f"{name}_rec{repeat}", proj_dim=args.proj_dim, probe_every_n_steps=10**9)
        fit(name, args.steps, [timer, recorder])
        recording += timer.step_times(skip={0})
        hooks += recorder.hook_seconds[1:]
    # probe steps as the recorder makes them (pool batches projected together) and with one batch per projection pass
    grouped_bytes, probe_seconds = quantities.PROJECTION_GROUP_BYTES, {}
    for label, group_bytes in (("ungrouped", 0), ("grouped", grouped_bytes)):
        quantities.PROJECTION_GROUP_BYTES = group_bytes
        recorder = TimedRecorder(workdir / f"{name}_probe_{label}", proj_dim=args.proj_dim,
                                 probe_every_n_steps=args.probe_every)
        model = fit(name, args.steps, [recorder])
        probe_seconds[label] = statistics.median(recorder.probe_seconds)
    quantities.PROJECTION_GROUP_BYTES = grouped_bytes
    rec = Recording.open(workdir / f"{name}_probe_grouped")
    shard_bytes = [sum(s["bytes"] for s in p["shards"]) for p in rec.manifest["probes"]]
    manifest_bytes = (workdir / f"{name}_probe_grouped" / "manifest.json").stat().st_size
    step_median = statistics.median(base)
    probe_median = probe_seconds["grouped"]
    return {
        "model": name,
        "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "pool_batches": len(rec.batches),
        "step_ms": 1e3 * step_median,
        "recording_step_ms": 1e3 * statistics.median(recording),
        "overhead_pct": 100 * (statistics.median(recording) / step_median - 1),
        # the fastest fifth of steps: less blurred by other processes' load spikes than the median
        "overhead_p20_pct": 100 * (_quantile(recording, 0.2) / _quantile(base, 0.2) - 1),
        "hook_ms": 1e3 * statistics.median(hooks),
        "hook_pct": 100 * statistics.median(hooks) / step_median,
        "probe_s": probe_median,
        "probe_ungrouped_s": probe_seconds["ungrouped"],
        "probe_over_step": probe_median / step_median,
        "probe_ms_per_pool_batch": 1e3 * probe_median / len(rec.batches),
        "bytes_per_probe_step": statistics.median(shard_bytes),
        "manifest_bytes_per_step": manifest_bytes / rec.num_steps,
        "initial_state_bytes": rec.manifest["initial_state"]["bytes"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lm", "vit"], choices=["lm", "vit"])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--proj-dim", type=int, default=1024)
    parser.add_argument("--probe-every", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=output_file, default=None,
                        help="also write the table to this FILE (markdown; its folder is created if missing); "
                             "default: print only")
    args = parser.parse_args()
    if args.out:  # before the work: the table cannot be lost at the end
        args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {args.threads} thread(s)"
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(name, args, Path(tmp)) for name in args.models]
    header = ("| model | params | pool T | step ms | step ms with recorder (no probes) "
              "| overhead (median, fastest 20%) "
              "| recorder work per step "
              "| probe step s | one batch per projection pass: s (ratio) | probe / step | ms per pool batch "
              "| bytes per probe step | manifest bytes per step |")
    lines = [
        f"# TrainOrderRecorder overhead ({device})", "",
        f"Command: `python benchmarks/recorder_overhead.py --steps {args.steps} --repeats {args.repeats} "
        f"--proj-dim {args.proj_dim} --probe-every {args.probe_every} --threads {args.threads}`", "",
        "Medians over steps (step 0 and the final probe excluded); runs with and without the recorder alternate. "
        "'Recorder work per step' is the time spent inside the recorder's per-step hook (no probe), measured "
        "directly, so machine load does not blur it. A probe step probes the validation set and every pool batch "
        f"(T = {args.steps}) with lpl.order.quantities at proj_dim {args.proj_dim}, stored as fp16; its pool batches' "
        "full-space rows are projected together (up to quantities.PROJECTION_GROUP_BYTES), and, for comparison, one "
        "batch per pass over the generated projection matrix (as before grouping).", "",
        header, "|" + "---|" * 13,
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['params']:,} | {r['pool_batches']} | {r['step_ms']:.1f} "
            f"| {r['recording_step_ms']:.1f} "
            f"| {r['overhead_pct']:+.1f}%, {r['overhead_p20_pct']:+.1f}% "
            f"| {r['hook_ms']:.3f} ms ({r['hook_pct']:.2f}%) | {r['probe_s']:.2f} | "
            f"{r['probe_ungrouped_s']:.2f} ({r['probe_ungrouped_s'] / r['probe_s']:.1f}x) "
            f"| {r['probe_over_step']:.0f}x | "
            f"{r['probe_ms_per_pool_batch']:.0f} | {r['bytes_per_probe_step']:,} | {r['manifest_bytes_per_step']:.0f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    print(json.dumps(rows, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, text)


if __name__ == "__main__":
    run_script(main)
