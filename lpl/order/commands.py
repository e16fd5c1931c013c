"""`lpl estimate`, `lpl curriculum`, `lpl position-map`, `lpl sensitivity`, `lpl check-methods`: the order estimator
from the command line.

Each ``*_main(argv)`` parses its own arguments, writes JSON/CSV and plots into ``--out`` (and, with ``--wandb
PROJECT``, logs them to Weights & Biases: offline unless you are logged in), and raises ``LplError`` on bad input (the
CLI prints it and exits with code 2).
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import csv
import functools
import io
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch

from lpl.order.estimator import log_estimates
from lpl.order.replay import METHODS, ReplayResult, as_orders, check_orders
from lpl.utils.errors import LplError
from lpl.utils.cli_args import Parser, checked_device, generator_seed, output_dir, positive_int
from lpl.utils.io import atomic_save_figure, atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from lpl.order.store import Recording


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recording", required=True, help="folder written by TrainOrderRecorder")
    parser.add_argument("--method", default="first_order", choices=METHODS, help="estimation method")
    parser.add_argument("--out", required=True, type=output_dir, help="output folder")
    parser.add_argument("--device", default="cpu", help="device for the replay (cpu, cuda)")
    parser.add_argument("--linear-loss", action="store_true",
                        help="read the final loss off linearly, without the validation curvature's quadratic term "
                             "(`lpl check-methods` shows which readout fits a recording)")
    _wandb_option(parser)


def _wandb_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wandb", metavar="PROJECT", default=None, type=_wandb_project,
                        help="also log to this Weights & Biases project (run files under --out)")


def _wandb_project(text: str) -> str:
    """``--wandb PROJECT``, once WANDB_MODE is known to be one wandb takes (checked before any work)."""
    from lpl.utils.loggers import check_wandb_mode

    try:
        check_wandb_mode()
    except LplError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


@contextlib.contextmanager
def _wandb_logger(args: argparse.Namespace, name: str) -> Iterator[Any]:
    """A WandbLogger for ``--wandb PROJECT`` (None without it), finished when the command is done."""
    if not args.wandb:
        yield None
        return
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(project=args.wandb, name=name, save_dir=args.out)
    logger.log_hyperparams({k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})
    try:
        yield logger
    except BaseException:
        logger.experiment.finish(exit_code=1)  # a failed command is a failed run in W&B, not a finished one
        raise
    logger.experiment.finish()


# the --out folder a running command created and the first of its parents it created (removed again, if still empty,
# when the command fails)
_created_out: contextvars.ContextVar[tuple[Path, Path] | None] = contextvars.ContextVar("created_out", default=None)


def _command(main: Callable[[Sequence[str] | None], int]) -> Callable[[Sequence[str] | None], int]:
    """A ``*_main`` that leaves no empty --out folder behind when it fails (a refused method or order, say)."""
    @functools.wraps(main)
    def run(argv: Sequence[str] | None = None) -> int:
        token = _created_out.set(None)
        try:
            return main(argv)
        except BaseException:
            _remove_empty(_created_out.get())
            raise
        finally:
            _created_out.reset(token)

    return run


def _remove_empty(created: tuple[Path, Path] | None) -> None:
    """Remove the folders from ``out`` up to ``top`` (the first that did not exist) while they are empty."""
    if created is None:
        return
    out, top = created
    for folder in [out, *out.parents]:
        if not folder.is_dir() or any(folder.iterdir()):
            return
        folder.rmdir()
        if folder == top:
            return


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> tuple[argparse.Namespace, Recording]:
    """The arguments and the opened --recording, with the --out folder created before any work: a path the
    parse-time check lets through may still be impossible to create (under /proc, a name too long for the file
    system). The recording is opened first, so that a wrong --recording leaves no empty --out folder behind."""
    from lpl.order.store import Recording

    args = parser.parse_args(argv)
    recording = Recording.open(args.recording)
    recording.verify(["pool"])  # small; the orders are read from it before any slower load verifies the rest
    out = Path(args.out).absolute()
    top = out
    while not top.parent.exists():
        top = top.parent
    existed = out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"argument --out: {str(args.out)!r}: cannot create it ({error.strerror or error}); choose "
                     "another path.")
    if not existed:
        _created_out.set((out, top))
    return args, recording


def _estimator(args: argparse.Namespace):
    from lpl.order.estimator import OrderEstimator

    device = checked_device(args.device)
    return OrderEstimator.from_recording(args.recording, method=args.method, quadratic=not args.linear_loss).to(device)


# random:N above these is a typo, not a study: the orders alone (and the replay's state) would fill memory
MAX_RANDOM_ORDERS = 100_000
MAX_RANDOM_ORDER_ITEMS = 50_000_000


ORDERS_HELP = ("random:N, or a file: a JSON list of orders (or of one order's batch ids), one order per line (batch "
               "ids separated by commas or spaces), the estimates.csv of `lpl estimate`, or the best_order.json of "
               "`lpl curriculum`")


def read_orders(spec: str, reference_order: Sequence[int] | torch.Tensor, seed: int = 0,
                recording: str | Path | None = None) -> torch.Tensor:
    """``random:N`` (N random permutations of the reference order: every batch as often as the run trained it, so
    a run of several epochs over one pool gets orders of its whole length), or a file: a JSON list of orders or one
    flat JSON list (one order), a JSON object with an ``order`` list (the best_order.json of ``lpl curriculum``), one
    order per line with batch ids separated by commas or spaces, or a CSV whose header has an ``order`` column (the
    estimates.csv of ``lpl estimate``). Returns long [N, L]; all orders of one length. A best_order.json found for
    another recording than ``recording`` is read with a warning (its ids name that run's pool batches)."""
    if spec.startswith("random:"):
        try:
            count = int(spec.split(":", 1)[1])
        except ValueError:
            raise LplError(f"--orders {spec!r}: write random:N with a whole number N.") from None
        items = torch.as_tensor(reference_order, dtype=torch.long).flatten().cpu()
        limit = max(1, min(MAX_RANDOM_ORDERS, MAX_RANDOM_ORDER_ITEMS // max(1, items.numel())))
        if not 0 < count <= limit:
            raise LplError(f"--orders {spec!r}: N must be between 1 and {limit:,} for orders of {items.numel()} "
                           "steps.")
        generator = torch.Generator().manual_seed(seed)
        # one permutation per row, drawn at once: argsort of uniform float64 keys (ties next to impossible)
        keys = torch.rand(count, items.numel(), generator=generator, dtype=torch.float64)
        return items[keys.argsort(dim=1)]
    path = Path(spec)
    if not path.is_file():
        raise LplError(f"--orders {spec!r} is neither random:N nor a file; pass {ORDERS_HELP}.")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark, as some editors write, is not content
    except UnicodeDecodeError:
        raise LplError(f"{path} is not UTF-8 text; save the orders as UTF-8 (JSON or one order per line).") from None
    if path.suffix.lower() == ".json" or text.lstrip().startswith(("[", "{")):
        orders = _json_orders(path, text, recording)
    else:
        orders = _text_orders(path, text)
    if not orders:
        raise LplError(f"{path} holds no order; write a JSON list of orders ([[3, 0, 1, 2], ...]) or one order per "
                       "line.")
    for row, order in enumerate(orders, 1):
        if not isinstance(order, list) or not order:
            raise LplError(f"{path}: order {row} is {order!r:.40}, not a non-empty list of batch ids.")
        for position, value in enumerate(order, 1):
            if type(value) is not int or not -(2**62) < value < 2**62:  # bools are ints to Python, not ids
                raise LplError(f"{path}: order {row} holds {value!r:.40} at position {position}, not a batch id: "
                               "batch ids are whole numbers from 0.")
            if value < 0:
                raise LplError(f"{path}: order {row} names batch id {value} at position {position}, but batch ids "
                               "count the pool's batches from 0.")
    if len({len(o) for o in orders}) != 1:
        raise LplError(f"{path}: all orders must have the same length (found {sorted({len(o) for o in orders})}).")
    return torch.tensor(orders, dtype=torch.long)


def _json_orders(path: Path, text: str, recording: str | Path | None = None) -> list[Any]:
    """The orders of a JSON file: a list of orders, or one flat list of batch ids (one order)."""
    try:
        orders = json.loads(text)
    except json.JSONDecodeError as error:
        raise LplError(f"{path} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}); fix "
                       "it, or write one order per line.") from None
    if isinstance(orders, dict) and isinstance(orders.get("order"), list):  # the best_order.json of `lpl curriculum`
        found_for = orders.get("recording")
        if recording is not None and isinstance(found_for, str) and _other_folder(found_for, recording):
            warnings.warn(f"{path} holds the best order `lpl curriculum` found for the recording {found_for}, not "
                          f"{recording}: its batch ids name that run's pool batches, which may be other data here.",
                          stacklevel=3)
        return [orders["order"]]
    if isinstance(orders, dict):
        raise LplError(f"{path} holds a JSON object without an \"order\" list; give a JSON list of orders "
                       "([[3, 0, 1, 2], ...]), one order per line, or the best_order.json of `lpl curriculum`.")
    if not isinstance(orders, list):
        raise LplError(f"{path} holds the JSON value {orders!r:.40}, not a list of orders; give [[3, 0, 1, 2], ...] "
                       "or one order [3, 0, 1, 2].")
    if orders and not any(isinstance(o, list) for o in orders):  # [3, 0, 1, 2]: one order
        return [orders]
    return orders


def _other_folder(first: str | Path, second: str | Path) -> bool:
    """Whether two paths name different existing folders (unknown ones count as the same: nothing to warn of)."""
    try:
        return not os.path.samefile(first, second)
    except OSError:
        return False


def _text_orders(path: Path, text: str) -> list[list[int]]:
    """The orders of a text file: one per line, batch ids separated by commas or spaces; or a CSV with a header whose
    ``order`` column holds them (the estimates.csv of ``lpl estimate``)."""
    lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    header = [field.strip() for field in lines[0][1].split(",")] if lines else []
    column = header.index("order") if "order" in header else None
    orders = []
    for number, line in lines[1:] if column is not None else lines:
        if column is not None:
            fields = next(csv.reader([line]))
            if len(fields) <= column:
                raise LplError(f"{path}, line {number}: no value in the order column.")
            line = fields[column]
        try:
            orders.append([int(x) for x in line.replace(",", " ").split()])
        except ValueError:
            raise LplError(f"{path}, line {number}: {line.strip()!r:.60} is not a list of integer batch ids; give one "
                           "order per line (ids separated by commas or spaces), a JSON list of orders, or the "
                           "estimates.csv of `lpl estimate` (its order column is read).") from None
    return orders


def _plot_curves(curves: torch.Tensor, reference: torch.Tensor, path: Path, limit: int = 20) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for curve in curves[:limit]:
        axis.plot(curve.numpy(), color="tab:blue", alpha=0.3, linewidth=1)
    axis.plot(reference.numpy(), color="black", linewidth=1.5, label="reference order")
    axis.set_xlabel("step")
    axis.set_ylabel("estimated validation loss")
    axis.legend()
    figure.tight_layout()
    atomic_save_figure(figure, path)


@_command
def estimate_main(argv: Sequence[str] | None = None) -> int:
    """`lpl estimate --recording DIR --orders FILE|random:N --out DIR`: estimates.json, estimates.csv, curves.png."""
    parser = Parser(prog="lpl estimate", description="Estimate the final loss of batch orders.")
    _common(parser)
    parser.add_argument("--orders", required=True, help=ORDERS_HELP)
    parser.add_argument("--seed", type=generator_seed, default=0, help="seed for random:N")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="orders replayed at once")
    args, recording = _parse(parser, argv)
    from lpl.order.checking import reference_loss_after

    # before the slow load: ids the pool lacks and orders longer than the run are refused here
    orders = check_orders(read_orders(args.orders, recording.order, args.seed, args.recording),
                          len(recording.batches), recording.num_steps)
    estimator = _estimator(args)
    finals, curves, ends = [], [], []
    for start in range(0, len(orders), args.batch_size):
        result = estimator.estimate_many(orders[start : start + args.batch_size])
        finals.append(result.final_loss.cpu())
        curves.append(result.loss_curve.cpu())
        ends.append(result.batch_losses.cpu())
    final, curve, end = torch.cat(finals), torch.cat(curves), torch.cat(ends)
    with _wandb_logger(args, "estimate") as logger:
        log_estimates(logger, ReplayResult(final_loss=final, loss_curve=curve, batch_losses=end),
                      prefix=f"estimate/{args.method}")
    out = Path(args.out)
    rows = [
        {"order": o.tolist(), "final_loss": float(f), "loss_curve": c.tolist(), "batch_losses": b.tolist()}
        for o, f, c, b in zip(orders, final, curve, end)
    ]
    # orders shorter than the run end after fewer steps: "no change" is the reference run's loss there
    steps = orders.shape[1]
    reference_loss = reference_loss_after(recording, steps)
    atomic_write_json(out / "estimates.json", {
        "recording": str(args.recording), "method": args.method, "linear_loss": args.linear_loss,
        "reference_loss": reference_loss, "estimates": rows,
    })
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["index", "final_loss", "order"])
    for i, (o, f) in enumerate(zip(orders, final)):
        writer.writerow([i, f"{float(f):.6f}", " ".join(map(str, o.tolist()))])
    atomic_write_text(out / "estimates.csv", buffer.getvalue())
    reference = estimator.estimate(estimator.reference_order[:steps].cpu().tolist()).loss_curve
    _plot_curves(curve, reference, out / "curves.png")
    best = int(final.argmin())
    print(f"{len(orders)} orders estimated ({args.method}); best #{best}: {float(final[best]):.4f}, reference "
          f"{reference_loss:.4f} (after {steps} steps); wrote {out}/estimates.json, estimates.csv, curves.png")
    return 0


@_command
def curriculum_main(argv: Sequence[str] | None = None) -> int:
    """`lpl curriculum --recording DIR --out DIR [--budget N --search genetic|local --verify]`: best_order.json."""
    from lpl.order.curriculum import SEARCH_METHODS, search

    parser = Parser(prog="lpl curriculum", description="Search a batch order by estimated loss.")
    _common(parser)
    parser.add_argument("--budget", type=int, default=4096, help="orders scored by the estimator")
    parser.add_argument("--search", default="genetic", choices=SEARCH_METHODS,
                        help="genetic: the paper's search; local: hill climbing by random swaps and moves (cheaper)")
    parser.add_argument("--population", type=int, default=64,
                        help="orders per generation of the genetic search (local: orders scored per round)")
    parser.add_argument("--seed", type=generator_seed, default=0, help="seed of the search's random choices")
    parser.add_argument("--verify", action="store_true", help="retrain the best order to check it (slow)")
    args, _ = _parse(parser, argv)
    estimator = _estimator(args)
    with _wandb_logger(args, "curriculum") as logger:
        result = search(estimator, budget=args.budget, method=args.search, population=args.population, seed=args.seed,
                        logger=logger)
        summary = {
            "recording": str(args.recording), "method": args.method, "linear_loss": args.linear_loss,
            "search": args.search, "order": result.order,
            "estimated_loss": result.score, "reference_loss": estimator.reference_loss, "history": result.history,
            "evaluations": result.evaluations,
        }
        out = Path(args.out)
        atomic_write_json(out / "best_order.json", summary)  # before the slow (and fallible) check by retraining
        _plot_progress(result.history, out / "search.png")
        if args.verify:
            from lpl.order.retraining import retrain

            retrained = retrain(args.recording, result.order, curve_every_n_steps=len(result.order)).final_loss
            summary["retrained_loss"] = retrained
            atomic_write_json(out / "best_order.json", summary)
            if logger is not None:
                logger.log_metrics({"curriculum/retrained_loss": retrained,
                                    "curriculum/reference_loss": estimator.reference_loss})
    retrained_text = f", retrained {summary['retrained_loss']:.4f}" if "retrained_loss" in summary else ""
    print(f"best order estimated {result.score:.4f}{retrained_text} (reference {estimator.reference_loss:.4f}) after "
          f"{result.evaluations} orders; wrote {out}/best_order.json, search.png")
    return 0


def _plot_progress(history: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 3.5))
    axis.plot(history, marker=".")
    axis.set_xlabel("generation / round")
    axis.set_ylabel("best estimated loss")
    figure.tight_layout()
    atomic_save_figure(figure, path)


@_command
def position_map_main(argv: Sequence[str] | None = None) -> int:
    """`lpl position-map --recording DIR --out DIR [--batches 0,5,9]`: position_map.csv and position_map.png."""
    from lpl.order.position import plot_position_map, position_map

    parser = Parser(prog="lpl position-map", description="End loss of each batch by its position.")
    _common(parser)
    parser.add_argument("--batches", default=None, help="comma-separated pool batch ids (default: all)")
    args, _ = _parse(parser, argv)
    estimator = _estimator(args)
    batches = None
    if args.batches:
        try:
            batches = [int(b) for b in args.batches.split(",")]
        except ValueError:
            raise LplError(f"--batches {args.batches!r}: give comma-separated integer batch ids.") from None
        if len(set(batches)) < len(batches):
            raise LplError(f"--batches {args.batches!r} names a batch twice; list each batch once.")
    with _wandb_logger(args, "position-map") as logger:
        matrix = position_map(estimator, batches, logger=logger)
    rows = batches if batches is not None else sorted(set(estimator.reference_order.cpu().tolist()))
    out = Path(args.out)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["batch"] + [f"position_{j}" for j in range(matrix.shape[1])])
    for batch, row in zip(rows, matrix):
        writer.writerow([batch] + [f"{float(v):.6f}" for v in row])
    atomic_write_text(out / "position_map.csv", buffer.getvalue())
    plot_position_map(matrix, out / "position_map.png", batches=rows)
    print(f"position map {tuple(matrix.shape)} ({args.method}); wrote {out}/position_map.csv, position_map.png")
    return 0


@_command
def sensitivity_main(argv: Sequence[str] | None = None) -> int:
    """`lpl sensitivity --recording DIR`: add the full-space sensitivity data to a recording (methods "linearized"
    and "adjoint")."""
    from lpl.order.adjoint import check_errors, misses_more_than_no_change, record_sensitivities
    from lpl.order.store import Recording

    parser = Parser(
        prog="lpl sensitivity",
        description="Build the full-space sensitivity data of a complete recording: the adjoint tables (method "
                    "adjoint) and the linearised Adam replay's data (method linearized).",
    )
    parser.add_argument("--recording", required=True, help="folder written by TrainOrderRecorder")
    parser.add_argument("--curvature-rank", type=int, default=8, help="top validation-curvature directions (0: none)")
    parser.add_argument("--hessian-rank", type=int, default=16,
                        help="eigenpairs kept of each reference batch's Hessian (0: adjoint tables only)")
    parser.add_argument("--accelerator", default="auto", help="device for the re-run and the tables (cpu, gpu, auto)")
    parser.add_argument("--check-orders", type=int, default=2, help="random orders retrained to check the estimates")
    args = parser.parse_args(argv)
    path = record_sensitivities(args.recording, curvature_rank=args.curvature_rank, hessian_rank=args.hessian_rank,
                                accelerator=args.accelerator, check_orders=args.check_orders)
    methods = "linearized or adjoint" if args.hessian_rank else "adjoint"
    print(f"wrote {path}; estimate with --method {methods}")
    recording = Recording.open(args.recording)
    info, reference_loss = recording.manifest["sensitivity"], recording.probe_scalars["val_loss"][-1]
    for method in methods.split(" or "):
        errors = check_errors(info["checks"], reference_loss, method)
        if errors is not None:
            verdict = "does NOT hold" if misses_more_than_no_change(*errors, reference_loss) else "holds"
            print(f"check on {len(info['checks'])} retrained orders: {method} misses by {errors[0]:.4g} on average, "
                  f"'no change' by {errors[1]:.4g}: it {verdict} for this run")
    if "reference_replay_drift" in info:
        print(f"the reference order replays to itself within {info['reference_replay_drift']:.2%} of the distance "
              "trained (stored gradients vs training's)")
    return 0


@_command
def check_methods_main(argv: Sequence[str] | None = None) -> int:
    """`lpl check-methods --recording DIR --orders random:N --out DIR`: every method against retrained orders
    (check.json, check.csv, check.png)."""
    from lpl.order.checking import LINEAR_LOSS, check_methods, plot_check

    parser = Parser(
        prog="lpl check-methods",
        description="Retrain a few orders and score every estimation method against them, next to 'no change'.")
    parser.add_argument("--recording", required=True, help="folder written by TrainOrderRecorder")
    parser.add_argument("--orders", default=None, help=f"{ORDERS_HELP}; default random:8")
    parser.add_argument("--seed", type=generator_seed, default=0, help="seed for random:N")
    parser.add_argument("--reuse", default=None, metavar="CHECK_JSON",
                        help="the check.json of an earlier check of this recording: score its orders again without "
                             "retraining them (after `lpl sensitivity`, say)")
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated methods (default: all of {', '.join(METHODS)})")
    parser.add_argument("--accelerator", default="cpu", help="device for retraining (cpu, gpu, auto)")
    parser.add_argument("--out", required=True, type=output_dir, help="output folder")
    _wandb_option(parser)
    args, recording = _parse(parser, argv)
    true_losses = None
    if args.reuse:
        if args.orders is not None:
            raise LplError(
                "--reuse scores the orders of the earlier check; drop --orders (or --reuse to retrain new ones)."
            )
        orders, true_losses = _earlier_check(args.reuse, recording)
    else:
        orders = read_orders(args.orders or "random:8", recording.order, args.seed, args.recording)
    methods = None if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    if methods == []:
        raise LplError(f"--methods {args.methods!r} names no method; give some of {', '.join(METHODS)}, or leave "
                       "--methods out for all of them.")
    with _wandb_logger(args, "check-methods") as logger:
        check = check_methods(args.recording, orders, methods, true_losses=true_losses, accelerator=args.accelerator,
                              logger=logger)
    out = Path(args.out)
    atomic_write_json(out / "check.json", {"recording": str(args.recording), **check.to_dict()})
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["method", "spearman", "pearson", "mae", "mae_over_no_change"])
    for method, score in check.scores.items():
        ratio = check.mae_over_no_change(method)
        writer.writerow([method, f"{score.spearman:.4f}", f"{score.pearson:.4f}", f"{score.mae:.6g}",
                         f"{ratio:.4f}" if check.no_change_mae else ""])
    atomic_write_text(out / "check.csv", buffer.getvalue())
    plot_check(check, out / "check.png")
    print(f"{len(orders)} retrained orders; 'no change' (reference loss {check.reference_loss:.4f}) misses by "
          f"{check.no_change_mae:.4g} on average")
    print(f"{'method':<30} {'spearman':>8} {'pearson':>8} {'mae':>10}  vs no change")
    for method, score in check.ranked():
        print(f"{method:<30} {score.spearman:>8.3f} {score.pearson:>8.3f} {score.mae:>10.4g}  "
              f"{check.mae_over_no_change(method):.2f}x")
    for method, why in check.skipped.items():
        print(f"{method:<30} skipped: {why}")
    if not check.scores:
        print("no method could be scored on this recording (see why above)")
    elif check.best is None:
        print("no method beats 'no change' on this run: do not trust the estimates here "
              "(see benchmarks/linearization_validity.py)")
    elif check.best.endswith(LINEAR_LOSS):
        print(f"best: {check.best} (estimate with --method {check.best.removesuffix(LINEAR_LOSS)} --linear-loss)")
    else:
        print(f"best: {check.best}")
    print(f"wrote {out}/check.json, check.csv, check.png")
    return 0


def _earlier_check(path: str, recording: Any) -> tuple[torch.Tensor, list[float]]:
    """Orders and retrained losses of an earlier ``check.json``, refused unless it was made for ``recording``."""
    from lpl.order.checking import reference_loss_after

    what = f"--reuse {path} is not a check.json written by `lpl check-methods`"
    fix = "pass the check.json in the --out folder of an earlier check of this recording"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or error
        raise LplError(f"--reuse {path}: cannot read it ({reason}); {fix}.") from None
    try:
        earlier = json.loads(text)
    except json.JSONDecodeError as error:
        raise LplError(f"{what} (not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}); {fix}."
                       ) from None
    if not isinstance(earlier, dict):
        raise LplError(f"{what} (it holds a JSON {type(earlier).__name__}, not an object); {fix}.")
    missing = [key for key in ("orders", "true_losses", "reference_loss") if key not in earlier]
    if missing:
        raise LplError(f"{what} (it has no {', '.join(missing)}); {fix}.")
    is_number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    true_losses, reference = earlier["true_losses"], earlier["reference_loss"]
    if not (isinstance(true_losses, list) and all(map(is_number, true_losses)) and is_number(reference)):
        raise LplError(f"{what} (its true_losses and reference_loss are not numbers); {fix}.")
    try:
        orders = as_orders(earlier["orders"])
    except LplError as error:
        raise LplError(f"{what} (its orders: {error}); {fix}.") from None
    if orders.ndim != 2:
        raise LplError(f"{what} (its orders are not a list of orders); {fix}.")
    true_losses, reference = [float(t) for t in true_losses], float(reference)
    expected = reference_loss_after(recording, orders.shape[-1])
    if not abs(reference - expected) <= 1e-6 * max(1.0, abs(reference)):
        raise LplError(f"--reuse {path} was made for another recording (reference loss {reference:.6g}, this one's "
                       f"{expected:.6g}).")
    return orders, true_losses
