"""``lpl prune``: prune a trained model described by a LightningCLI config, without training.

    lpl prune --config configs/mnist_vit.yaml --ckpt_path outputs/mnist_vit/checkpoints/last.ckpt --flops_keep 0.5 \
              --out outputs/prune_result
"""

from __future__ import annotations

import argparse
import warnings
from typing import Any

from lpl.prune.api import ALLOCATIONS
from lpl.prune.blocks import parse_block_size
from lpl.prune.importance import IMPORTANCES, LOSSES
from lpl.utils.errors import LplError
from lpl.utils.cli_args import Parser, output_dir


# what passes to the config's LightningCLI; anything else unknown is a mistake in this command's own options
_PASSTHROUGH = ("--model", "--data", "--trainer", "--seed_everything", "--optimizer", "--lr_scheduler")


def _parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="lpl prune", defaults_in_help=False,  # defaults come from the config: the help says which
        description="Post-training block pruning: calibrate on the config's training data, allocate densities to a "
        "FLOPs budget, save the PruneResult (safetensors + JSON). Pruning options left out are taken from the "
        "config's BlockPruneCallback when it has one, else the callback's defaults (shown). --model.*, --data.* and "
        "--trainer.* options pass to the config.",
    )
    add = lambda name, **kwargs: parser.add_argument(f"--{name}", **kwargs)  # noqa: E731
    add("config", required=True, help="LightningCLI config naming the model and data")
    add("ckpt_path", help="the trained model: a Lightning checkpoint, 'last' or 'best' of the config's checkpoint "
                          "folder, or a weights file of the LightningModule or of the network inside it (default: the "
                          "config's weights)")
    add("out", default="prune_result", type=output_dir, help="folder for the PruneResult (default: prune_result)")
    add("flops_keep", type=float, help="share of the pruned layers' FLOPs to keep, in (0, 1] (default 0.5)")
    add("block_size", type=int, nargs="+", metavar="N",
        help="block rows and columns, or one number for square blocks (default 16 16)")
    add("importance", choices=IMPORTANCES, help="block importance (default taylor2)")
    add("allocation", choices=ALLOCATIONS, help="per-layer density allocation (default hardware)")
    add("lambda_power", type=float, help="weight of predicted energy against latency in the hardware objective "
                                         "(default 1.0)")
    add("min_density", type=float, help="least share of blocks a pruned layer keeps (default 0.05)")
    add("max_density", type=float, help="most share of blocks a pruned layer keeps (default 1.0)")
    add("calib_batches", type=int, help="training batches that calibrate (default 32)")
    add("stages", type=int, help="calibration rounds on shrinking budgets (default 2)")
    add("first_order", action="store_true", default=None, help="add taylor2's gradient term")
    add("loss", default="auto", choices=LOSSES,
        help="calibration loss; auto: the module's task loss when it defines one, else the logit energy")
    add("include", nargs="*", help="glob patterns on Linear module names to prune (default: every Linear but heads)")
    add("exclude", nargs="*", help="glob patterns on Linear module names to leave dense (default: *head*)")
    return parser


def _options(args: argparse.Namespace, trainer: Any) -> tuple[dict[str, Any], int, Any]:
    """(prune_model options, calib_batches, cost model): the command line's, else the config's BlockPruneCallback's,
    else the callback's defaults."""
    from lpl.prune.callback import BlockPruneCallback

    configured = next((c for c in trainer.callbacks if isinstance(c, BlockPruneCallback)), None) or BlockPruneCallback()
    options = dict(configured.options)
    options.update({name: value for name, value in vars(args).items() if name in options and value is not None})
    block_size = options["block_size"]
    if isinstance(block_size, list):  # from the command line: one number (square) or two
        if len(block_size) > 2:
            raise LplError(f"--block_size takes one or two numbers, got {len(block_size)}: {block_size}.")
        block_size = block_size[0] if len(block_size) == 1 else tuple(block_size)
    options["block_size"] = parse_block_size(block_size)
    calib_batches = args.calib_batches if args.calib_batches is not None else configured.calib_batches
    return options, calib_batches, configured.cost_model


def _load_weights(model: Any, path: str) -> None:
    """Load ``path`` into the LightningModule ``model``: its own state dict (a Lightning checkpoint), or exactly the
    state dict of a network inside it (keys without the module's attribute prefix, as ``pretrained_path`` takes)."""
    from lpl.lightning_cli import state_dict_mismatch
    from lpl.utils.weights import read_state_dict

    state = read_state_dict(path, strip_prefixes=False, what="--ckpt_path")
    targets = {"": model, **{name: child for name, child in model.named_children() if child.state_dict()}}
    owns = {name: target.state_dict() for name, target in targets.items()}
    for name, own in owns.items():
        if state_dict_mismatch(own, state) is None:
            targets[name].load_state_dict(state)
            return
    closest = max(owns, key=lambda name: len(owns[name].keys() & state.keys()))  # what the file was meant for
    which = f"its network {closest!r}" if closest else "the config's model"
    raise LplError(f"{path!r} does not match {which} ({state_dict_mismatch(owns[closest], state)}); pass the "
                   "checkpoint of a run made with this config (or that run's --model settings).")


def prune_main(argv: list[str]) -> int:
    """``lpl prune``: prune a checkpoint's model with ``prune_model`` and save the PruneResult (see ``--help``)."""
    parser = _parser()
    args, passthrough = parser.parse_known_args(argv)
    unknown = [a for a in passthrough if a.startswith("--") and not a.startswith(_PASSTHROUGH)]  # "-0.5": a value
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    # imported after the arguments: --help and mistakes answer at once
    from lpl.lightning_cli import checkpoint_file, run_lightning_cli
    from lpl.prune.api import prune_model

    cli = run_lightning_cli(["--config", args.config, *passthrough], run=False)
    model, datamodule = cli.model, cli.datamodule
    if args.ckpt_path:
        _load_weights(model, checkpoint_file(args.ckpt_path, cli.trainer))
    elif not getattr(model, "hparams", {}).get("pretrained_path"):
        warnings.warn("lpl prune: no --ckpt_path and the config's model loads no pretrained weights: pruning its "
                      "freshly initialised weights. Pass the trained model with --ckpt_path.", stacklevel=2)
    # calibrate, and predict costs, on the device the config's Trainer runs on (fit's BlockPruneCallback does)
    model.to(cli.trainer.strategy.root_device)
    datamodule.setup("fit")
    options, calib_batches, cost_model = _options(args, cli.trainer)
    result = prune_model(model, datamodule.train_dataloader(), calib_batches=calib_batches, cost_model=cost_model,
                         loss=args.loss, **options)
    result.save(args.out)
    print(
        f"pruned {len(result.block_masks)} layers to {result.flops_keep:.3f} of their FLOPs "
        f"(target {options['flops_keep']}); predicted speedup {result.predicted_speedup:.2f}x, "
        f"energy ratio {result.predicted_energy_ratio:.2f}; saved to {args.out}"
    )
    return 0
