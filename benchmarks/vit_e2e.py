"""End to end: timm DeiT-S/B dense vs block-pruned and exported to lpl.kernels, images/s and energy per image.

The pruned model keeps ``--flops-keep`` of the prunable Linear layers' FLOPs (qkv, proj, fc1, fc2; the head stays
dense), chosen by ``lpl.prune.prune_model`` on a few random calibration images (random init weights: this measures
speed, not accuracy), then exported with ``lpl.prune.to_block_sparse``. Energy per image is measured with NVML
(``lpl.telemetry.PowerMeter``, idle-subtracted) on NVIDIA GPUs; elsewhere it is the cost model's prediction
(``lpl.prune.hardware.default_profile``) for the Linear layers. Results go to
benchmarks/results/vit_e2e_<device>[_quick].md.

    python benchmarks/vit_e2e.py --quick            # CPU here: DeiT-S and DeiT-B, batch 8, fp32
    python benchmarks/vit_e2e.py                    # GPU: bf16, batch 64, 64x64 blocks
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
from pathlib import Path

import torch
from lpl.utils import cli_args
from lpl.utils.errors import run_script

_HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("lpl_kernel_benchmark", _HERE / "kernels.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench
_spec.loader.exec_module(bench)

MODELS = {"deit_s": "deit_small_patch16_224", "deit_b": "deit_base_patch16_224"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_model(name: str, device: torch.device) -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model(MODELS[name], pretrained=False).to(device).eval()


def calibration_batches(count: int, batch: int, device: torch.device) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    return [{"image": torch.randn(batch, 3, 224, 224, generator=generator).to(device),
             "label": torch.randint(0, 1000, (batch,), generator=generator).to(device),
             "index": torch.arange(i * batch, (i + 1) * batch, device=device)} for i in range(count)]


def prune(model: torch.nn.Module, args, device: torch.device):
    """Block masks at the FLOPs budget: lpl.prune.prune_model (magnitude importance keeps calibration cheap)."""
    from lpl.prune import prune_model

    return prune_model(model, calibration_batches(args.calib_batches, args.calib_batch_size, device),
                       block_size=(args.block, args.block), flops_keep=args.flops_keep, importance=args.importance,
                       exclude=["*head*"])


def cuda_graph(fn):
    """Capture ``fn`` (after warm-up and autotuning) in a CUDA graph; return its replay."""
    fn()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def predicted_energy_per_image(model: torch.nn.Module, masks: dict, block: int, tokens: int, batch: int,
                               dtype: torch.dtype, profile) -> float:
    """Cost-model energy of the model's Linear layers for one batch, per image (dense layers: predict_dense)."""
    total = 0.0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            rows = tokens if "head" not in name else batch
            mask = masks.get(name)
            if mask is not None and not bool(mask.all()):
                total += profile.predict(mask, rows, (block, block), dtype)[1]
            else:
                total += profile.predict_dense(module.out_features, module.in_features, rows, dtype)[1]
    return total / batch


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, torch.device]:
    """The command line and the device, every value checked before any work (model building, pruning, the table):
    a mistake is the parser's usage error (exit code 2)."""
    from lpl.prune.importance import IMPORTANCES
    from lpl.utils.cli_args import output_dir, positive_int, unit_fraction

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda where there is a GPU, else cpu)")
    parser.add_argument("--models", nargs="+", default=["deit_s", "deit_b"], choices=sorted(MODELS))
    parser.add_argument("--quick", action="store_true", help="small batch, short timing (CPU in a few minutes)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--batch", type=positive_int, help="images per forward (default: 64 on CUDA, 8 on CPU)")
    parser.add_argument("--block", type=positive_int, default=64, help="square block side (default 64)")
    parser.add_argument("--flops-keep", type=unit_fraction, default=0.5,
                        help="share of the prunable Linear FLOPs kept, in (0, 1] (default 0.5)")
    parser.add_argument("--importance", default="magnitude", choices=IMPORTANCES,
                        help="lpl.prune importance (default magnitude; taylor2 needs more time)")
    parser.add_argument("--calib-batches", type=positive_int, default=2)
    parser.add_argument("--calib-batch-size", type=positive_int, default=4)
    parser.add_argument("--budget-s", type=cli_args.positive_float, default=None,
                        help="seconds of timing rounds per model (default 10, quick 2)")
    parser.add_argument("--energy-s", type=cli_args.positive_float, default=5.0,
                        help="GPU: seconds per NVML energy measurement")
    parser.add_argument("--profile", help="HardwareProfile JSON for predicted energy (default: the analytic one)")
    parser.add_argument("--eager", action="store_true", help="GPU: time eager forwards instead of CUDA graphs")
    parser.add_argument("--out", type=output_dir, default=str(_HERE / "results"),
                        help="output FOLDER (created if missing); the table goes to vit_e2e_<device>[_quick].md in "
                             "it (default: benchmarks/results)")
    args = parser.parse_args(argv)
    device = cli_args.device_argument(parser, args.device)
    if device.type == "cuda":
        bench.import_lpl_kernels()
        from lpl.kernels.ops import TRITON_MIN_BLOCK, triton_supports

        if not triton_supports((args.block, args.block)):  # it would time dense matmuls under the sparse label
            parser.error(f"--block {args.block}: the CUDA (Triton) kernels take power-of-two block sides of at least "
                         f"{TRITON_MIN_BLOCK} (16, 32, 64, ...); other blocks run as dense matmuls there.")
    if importlib.util.find_spec("timm") is None:
        parser.error("the models come from timm, which is not installed: pip install timm.")
    return args, device


def main(argv: list[str] | None = None) -> None:
    args, device = parse_args(argv)
    from lpl.prune.hardware import HardwareProfile, default_profile

    # read before any work: a bad --profile file is an LplError (its message, exit code 2)
    profile = HardwareProfile.load(args.profile) if args.profile else default_profile(device.type)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    batch = args.batch if args.batch is not None else (64 if device.type == "cuda" else 8)
    budget_s = args.budget_s if args.budget_s is not None else (2.0 if args.quick else 10.0)
    bench.import_lpl_kernels()  # makes lpl.kernels importable from a plain checkout
    from lpl.kernels import pack_for_inference
    from lpl.prune.export import to_block_sparse

    meter, energy_note = None, ""
    if device.type == "cuda":
        from lpl.telemetry import PowerMeter, PowerMeterUnavailable

        try:
            meter = PowerMeter(device.index or 0)
            meter.measure_idle(2.0)
        except PowerMeterUnavailable as error:
            energy_note = str(error)
    energy_kind = ("measured (NVML, idle-subtracted)" if meter
                   else f"model-predicted (cost model '{profile.name}', Linear layers only)")

    lines = ["# End to end: DeiT dense vs block-pruned + exported (lpl.kernels)", ""]
    lines += bench.environment_lines(device, sys.argv)
    lines += [f"- batch {batch} images ({batch * 197} tokens), dtype {dtype}, blocks {args.block}x{args.block}, "
              f"FLOPs kept in prunable Linear layers: target {args.flops_keep}, importance {args.importance}, "
              f"random-init weights (timm, pretrained=False)",
              f"- energy per image: {energy_kind}{' (' + energy_note + ')' if energy_note else ''}",
              "- images/s measured side by side in this run (CPU: interleaved rounds; GPU: CUDA-graph replays of the "
              "whole forward unless --eager, timed with CUDA events)", "",
              "- CPU: also the exported model after lpl.kernels.pack_for_inference (weights laid out once)", "",
              "| model | FLOPs kept (Linear) | dense img/s | sparse img/s | speedup | packed speedup (CPU) | "
              "dense J/img | sparse J/img | energy ratio | rel. err vs masked dense |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    from lpl.utils.io import atomic_write_text

    path = Path(args.out) / (f"vit_e2e_{bench.device_slug(device)}" + ("_quick" if args.quick else "") + ".md")
    for name in args.models:
        dense = build_model(name, device)
        result = prune(dense, args, device)
        masked = copy.deepcopy(dense)
        for layer, mask in result.block_masks.items():
            module = masked.get_submodule(layer)
            expanded = mask.to(device).repeat_interleave(args.block, 0).repeat_interleave(args.block, 1)
            module.weight.data *= expanded[: module.out_features, : module.in_features]
        sparse = to_block_sparse(copy.deepcopy(masked), result).to(dtype)
        packed = pack_for_inference(copy.deepcopy(sparse)) if device.type == "cpu" else None
        dense, masked = dense.to(dtype), masked.to(dtype)
        images = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
        with torch.inference_mode():
            reference = masked(images).float()
            rel_err = float((sparse(images).float() - reference).norm() / reference.norm())
            runs = {"dense": lambda: dense(images), "sparse": lambda: sparse(images)}
            if packed is not None:
                runs["packed"] = lambda: packed(images)
            if device.type == "cuda" and not args.eager:  # whole forward as one graph: no Python launch overhead
                runs = {key: cuda_graph(run) for key, run in runs.items()}
                ms = {key: bench.gpu_time_ms(run, graph=False) for key, run in runs.items()}
            else:
                ms = bench.time_side_by_side(runs, device, budget_s)
            if meter:
                dense_j = meter.measure(runs["dense"], batch, min_seconds=args.energy_s).joules_per_item
                sparse_j = meter.measure(runs["sparse"], batch, min_seconds=args.energy_s).joules_per_item
            else:
                dense_j = predicted_energy_per_image(dense, {}, args.block, batch * 197, batch, dtype, profile)
                sparse_j = predicted_energy_per_image(dense, result.block_masks, args.block, batch * 197, batch,
                                                      dtype, profile)
        dense_ips, sparse_ips = 1000.0 * batch / ms["dense"], 1000.0 * batch / ms["sparse"]
        packed_speedup = f"{ms['dense'] / ms['packed']:.2f}x" if "packed" in ms else "-"
        row = (f"| {name} | {result.flops_keep:.3f} | {dense_ips:.1f} | {sparse_ips:.1f} | "
               f"{sparse_ips / dense_ips:.2f}x | {packed_speedup} | {dense_j:.4g} | {sparse_j:.4g} | "
               f"{dense_j / sparse_j:.2f}x | {rel_err:.1e} |")
        lines.append(row)
        print(row, flush=True)
        atomic_write_text(path, "\n".join(lines) + "\n")
    print(f"\nwritten {path}")


if __name__ == "__main__":
    run_script(main)
