"""``lpl prune``: prune a trained model described by a LightningCLI config, without training.

    lpl prune --config configs/mnist_vit.yaml --ckpt_path outputs/mnist_vit/.../last.ckpt --flops_keep 0.5 \
              --out outputs/prune_result
"""

from __future__ import annotations

import argparse

from lpl.prune.importance import IMPORTANCES

from lpl.utils.errors import LplError
from lpl.utils.io import output_dir


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lpl prune",
        description="Post-training block pruning: calibrate on the config's training data, allocate densities to a "
        "FLOPs budget, save the PruneResult (safetensors + JSON). Other --model/--data options pass to the config.",
    )
    parser.add_argument("--config", required=True, help="LightningCLI config naming the model and data")
    parser.add_argument("--ckpt_path", help="Lightning checkpoint or weights file of the trained model")
    parser.add_argument("--out", default="prune_result", type=output_dir, help="folder for the PruneResult")
    parser.add_argument("--flops_keep", type=float, default=0.5)
    parser.add_argument("--block_size", type=int, nargs=2, default=(16, 16), metavar=("ROWS", "COLS"))
    parser.add_argument("--importance", default="taylor2", choices=IMPORTANCES)
    parser.add_argument("--allocation", default="hardware", choices=("hardware", "uniform", "global"))
    parser.add_argument("--lambda_power", type=float, default=1.0)
    parser.add_argument("--min_density", type=float, default=0.05)
    parser.add_argument("--max_density", type=float, default=1.0)
    parser.add_argument("--calib_batches", type=int, default=32)
    parser.add_argument("--stages", type=int, default=2, help="calibration rounds on shrinking budgets")
    parser.add_argument("--first_order", action="store_true", help="add taylor2's gradient term")
    parser.add_argument("--loss", default="auto", choices=("auto", "task", "logit_energy"),
                        help="calibration loss; auto: the module's task loss when it defines one, else the logit energy")
    parser.add_argument("--include", nargs="*", default=None, help="glob patterns on Linear module names")
    parser.add_argument("--exclude", nargs="*", default=None)
    return parser


def prune_main(argv: list[str]) -> int:
    """``lpl prune``: prune a checkpoint's model with ``prune_model`` and save the PruneResult (see ``--help``)."""
    from lpl.cli import run_lightning_cli
    from lpl.prune.api import prune_model
    from lpl.utils.weights import read_state_dict

    args, passthrough = _parser().parse_known_args(argv)
    cli = run_lightning_cli(["--config", args.config, *passthrough], run=False)
    model, datamodule = cli.model, cli.datamodule
    if args.ckpt_path:
        state = read_state_dict(args.ckpt_path, strip_prefixes=False, what="--ckpt_path")
        ours = model.state_dict()
        missing = [k for k in ours if k not in state]
        unexpected = [k for k in state if k not in ours]
        reshaped = [k for k in ours if k in state and tuple(state[k].shape) != tuple(ours[k].shape)]
        if missing or unexpected or reshaped:
            raise LplError(
                f"{args.ckpt_path!r} does not match the config's model (missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}, other shapes {reshaped[:3]}); pass the checkpoint of a run made with this config."
            )
        model.load_state_dict(state)
    datamodule.setup("fit")
    result = prune_model(
        model, datamodule.train_dataloader(), block_size=tuple(args.block_size), flops_keep=args.flops_keep,
        importance=args.importance, allocation=args.allocation, lambda_power=args.lambda_power,
        min_density=args.min_density, max_density=args.max_density, include=args.include,
        exclude=args.exclude, calib_batches=args.calib_batches, stages=args.stages, first_order=args.first_order,
        loss=args.loss,
    )
    result.save(args.out)
    print(
        f"pruned {len(result.block_masks)} layers to {result.flops_keep:.3f} of their FLOPs "
        f"(target {args.flops_keep}); predicted speedup {result.predicted_speedup:.2f}x, "
        f"energy ratio {result.predicted_energy_ratio:.2f}; saved to {args.out}"
    )
    return 0
