"""The Trainer commands of ``lpl`` (fit / validate / test / predict): Lightning's LightningCLI with lpl's additions.

Its classes live at module level so that ``--trainer.strategy=ddp_spawn`` can pickle the CLI and its callback into
the processes it starts (classes local to a function cannot be pickled).
"""

from __future__ import annotations

import contextlib
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from lpl.utils.errors import LplError

# Lightning's seed_everything takes numpy's seeds and raises a ValueError for others
MAX_SEED = 2**32 - 1
# --ckpt_path values the Trainer resolves itself instead of reading a file
_SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")


class LastValidationStep(L.Callback):
    """The global step of a fit's last validation run (its metrics are that step's weights')."""

    step: int | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.step = trainer.global_step


class LplCLI(LightningCLI):
    """LightningCLI that resolves ``--ckpt_path best`` in a new process, says in one line why a checkpoint cannot
    load, prints the final metrics and writes ``predict``'s predictions."""

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parse, then refuse what LightningCLI would meet with a traceback before any hook runs: a seed numpy does not
        take, and a ``--ckpt_path`` file that is no Lightning checkpoint (LightningCLI reads it right after parsing)."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        seed = config.get("seed_everything")
        if isinstance(seed, int) and not isinstance(seed, bool) and not 0 <= seed <= MAX_SEED:
            raise LplError(f"--seed_everything {seed} is out of range: seeds go from 0 to {MAX_SEED}; pass one of "
                           "those, or true for a random seed.")
        ckpt_path = config.get("ckpt_path")
        if ckpt_path and str(ckpt_path) not in _SPECIAL_CKPT_PATHS and Path(ckpt_path).exists():
            problem = checkpoint_problem(ckpt_path)
            if problem is not None:
                raise LplError(problem)

    # The subcommands LightningCLI runs (it calls these methods instead of the Trainer's when they exist).
    def fit(self, **kwargs: Any) -> None:
        with self._checkpoint_errors():
            self.trainer.fit(**kwargs)

    def validate(self, **kwargs: Any) -> None:
        with self._checkpoint_errors():
            self.trainer.validate(**kwargs)

    def test(self, **kwargs: Any) -> None:
        with self._checkpoint_errors():
            self.trainer.test(**kwargs)

    def predict(self, **kwargs: Any) -> None:
        path = self._predictions_path()
        if path.exists() and not path.is_file():  # said before predicting, not after
            raise LplError(f"lpl predict writes {path}, but a {'folder' if path.is_dir() else 'non-file'} is there; "
                           "move it, or set --trainer.default_root_dir to another folder.")
        with self._checkpoint_errors():
            predictions = self.trainer.predict(**kwargs)
        self._save_predictions(predictions)

    def _predictions_path(self) -> Path:
        trainer = self.trainer
        rank = "" if trainer.world_size == 1 else f"-rank{trainer.global_rank}"
        return Path(trainer.default_root_dir) / f"predictions{rank}.safetensors"

    @contextlib.contextmanager
    def _checkpoint_errors(self) -> Iterator[None]:
        """The checkpoint the Trainer chose (a file, or what 'last' / 'best' resolved to) failing to load: one
        LplError saying what the file is or how its weights differ from the model's, instead of the loader's
        traceback. Any other error passes unchanged."""
        try:
            yield
        except (OSError, EOFError, RuntimeError, KeyError, pickle.UnpicklingError) as error:
            path = self.trainer.ckpt_path
            message = None
            if path is not None and Path(path).exists():
                message = checkpoint_problem(path) or self._other_model(path, error)
            if message is None:
                raise
            raise LplError(message) from error

    def _other_model(self, path: str | Path, error: BaseException) -> str | None:
        """For load_state_dict's refusal of ``path``'s weights: which keys and shapes differ, and what to pass."""
        if not (isinstance(error, RuntimeError) and str(error).startswith("Error(s) in loading state_dict")):
            return None
        checkpoint = _load_checkpoint(path)
        differs = state_dict_mismatch(self.model.state_dict(), checkpoint["state_dict"])
        if differs is None:
            return None
        rebuild = ""
        given = str(self.config[self.subcommand].get("ckpt_path"))
        if checkpoint.get("hyper_parameters") and given in ("last", "best"):  # a path: LightningCLI reads them
            rebuild = f"pass the file itself (--ckpt_path={path}) to rebuild the model from its hyperparameters, or "
        return (f"--ckpt_path {str(path)!r} holds the weights of another model than the config's ({differs}); "
                f"{rebuild}give the --model settings of the run that saved it (runs of one config share its "
                "checkpoint folder).")

    def _save_predictions(self, predictions: Any) -> None:
        """Write ``predict``'s outputs (per-batch tensors or dicts of tensors, joined along the batch) as
        ``predictions.safetensors`` in the Trainer's default_root_dir, one file per process, and say where."""
        from lpl.utils.io import save_safetensors_atomic

        trainer = self.trainer
        if predictions is None:
            warnings.warn("lpl predict: the Trainer returned no predictions (return_predictions=false, or a strategy "
                          "that spawns processes), so none are written.", stacklevel=2)
            return
        loaders = predictions if len(trainer.num_predict_batches) > 1 else [predictions]
        try:
            tensors = {}
            for number, outputs in enumerate(loaders):
                prefix = f"dataloader{number}/" if len(loaders) > 1 else ""
                tensors.update({prefix + key: value for key, value in _joined(outputs).items()})
        except (TypeError, RuntimeError) as error:
            warnings.warn(f"lpl predict: the predictions could not be written ({error}); return a tensor or a dict of "
                          "tensors with one row per sample from predict_step.", stacklevel=2)
            return
        path = self._predictions_path()
        try:
            save_safetensors_atomic(tensors, path)
        except OSError as error:
            raise LplError(f"lpl predict could not write {path} ({error.strerror or error}); set "
                           "--trainer.default_root_dir to a folder it can write.") from None
        rows = next(iter(tensors.values())).shape[0] if tensors else 0
        print(f"predictions of {rows} samples ({', '.join(tensors)}) written to {path}")

    def before_validate(self) -> None:
        resolve_best(self.config_init["validate"], self.trainer)

    def before_test(self) -> None:
        resolve_best(self.config_init["test"], self.trainer)

    def before_predict(self) -> None:
        resolve_best(self.config_init["predict"], self.trainer)

    def before_fit(self) -> None:
        self.last_validation = LastValidationStep()
        self.trainer.callbacks.append(self.last_validation)

    def after_fit(self) -> None:
        self._report("fit")

    def after_validate(self) -> None:
        self._report("validate")

    def after_test(self) -> None:
        self._report("test")

    def _report(self, stage: str) -> None:
        """Print the metrics, saying when a fit's last validation came before its last step (they are that step's)."""
        if not self.trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith(("val/", "test/"))}
        validated = getattr(getattr(self, "last_validation", None), "step", None)
        earlier = stage == "fit" and validated is not None and validated != self.trainer.global_step
        when = (f" at step {validated} (the last validation; training ended at step {self.trainer.global_step})"
                if earlier else "")
        if "val/acc" in metrics:
            label = f"validation accuracy{when}" if earlier else "final validation accuracy"
            print(f"{label}: {metrics['val/acc']:.4f}")
        if metrics:
            print(f"{stage} metrics{when}: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))


def run_lightning_cli(args: list[str] | None = None, run: bool = True) -> LplCLI:
    """Build (and with ``run``, run) the LightningCLI: any LightningModule / LightningDataModule by class path."""
    with warnings.catch_warnings():
        # an argument list given on purpose (`lpl prune` builds the CLI from its own): not the mistake it warns of
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return LplCLI(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )


def resolve_best(init: Any, trainer: L.Trainer) -> None:
    """``--ckpt_path best`` in a new process: Lightning knows the best checkpoint only in the process that trained,
    so read it off the ModelCheckpoint state the run saved in ``last.ckpt`` of the callback's folder. ``init``: the
    subcommand's parsed arguments (a jsonargparse Namespace), whose ``ckpt_path`` this sets."""
    callback = trainer.checkpoint_callback
    if init.get("ckpt_path") != "best" or callback is None or callback.best_model_path:
        return  # Lightning decides (and explains what is missing)
    if not callback.dirpath:
        raise LplError("--ckpt_path best: the run's ModelCheckpoint has no dirpath, so a new process cannot find the "
                       "run's checkpoints; pass a checkpoint file (or give ModelCheckpoint a dirpath).")
    last = last_checkpoint(callback)
    best = None
    if last.is_file():
        try:
            # memory-mapped: only the callbacks' state is read, not the weights and optimizer state
            states = torch.load(last, map_location="cpu", weights_only=True, mmap=True).get("callbacks", {})
        except Exception as error:  # unreadable: said below, as for a missing one
            states = {}
            warnings.warn(f"lpl: could not read {last} ({type(error).__name__}).", stacklevel=2)
        state = states.get(callback.state_key) or next(
            (v for k, v in states.items() if k.startswith("ModelCheckpoint") and v.get("best_model_path")), {})
        best = state.get("best_model_path") or None
    if best is None or not Path(best).is_file():
        found = f"it names {best}, which is gone" if best else "there is none, or it records no best checkpoint"
        raise LplError(f"--ckpt_path best: a new process reads the best checkpoint off the run's last checkpoint "
                       f"({last}), and {found}; pass a checkpoint file or 'last'.")
    init["ckpt_path"] = best


def last_checkpoint(callback: ModelCheckpoint) -> Path:
    """The newest last*.ckpt in ``callback``'s folder, as Lightning resolves ``--ckpt_path last`` (a fresh run in a
    folder an earlier run used writes last-v1); the plain last.ckpt path when there is none."""
    folder = Path(callback.dirpath)
    lasts = sorted(folder.glob(f"{callback.CHECKPOINT_NAME_LAST}*{callback.FILE_EXTENSION}"),
                   key=lambda path: path.stat().st_mtime)
    return lasts[-1] if lasts else folder / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"


def checkpoint_file(ckpt_path: str, trainer: L.Trainer) -> str:
    """``ckpt_path`` as a file for commands that read checkpoints themselves (``lpl prune``): 'last' and 'best'
    resolved as the Trainer commands resolve them in a new process, anything else as given."""
    if ckpt_path not in ("last", "best"):
        return ckpt_path
    callback = trainer.checkpoint_callback
    if callback is None or not callback.dirpath:
        raise LplError(f"--ckpt_path {ckpt_path}: the config has no ModelCheckpoint folder to find it in; pass a "
                       "checkpoint file.")
    if ckpt_path == "best":
        init = {"ckpt_path": "best"}
        resolve_best(init, trainer)
        return init["ckpt_path"]
    last = last_checkpoint(callback)
    if not last.is_file():
        raise LplError(f"--ckpt_path last: {callback.dirpath} holds no last checkpoint (train first with `lpl fit` "
                       "and this config); pass a checkpoint file.")
    return str(last)


def _load_checkpoint(path: str | Path) -> Any:
    """``torch.load`` without unpickling objects; memory-mapped where the format allows, so tensors are not read."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))


def checkpoint_problem(path: str | Path) -> str | None:
    """Why the existing ``path`` cannot be a Lightning checkpoint to resume or evaluate (a folder, an empty,
    truncated or unreadable file, weights without the training state), with what to pass instead; None when it
    reads as one."""
    path = Path(path)
    what = f"--ckpt_path {str(path)!r}"
    if path.is_dir():
        inside = sorted(path.glob("*.ckpt"))
        example = f" (such as {inside[0]})" if inside else ""
        return f"{what} is a folder; pass a checkpoint file in it{example}, or 'last' / 'best'."
    if path.stat().st_size == 0:
        return f"{what} is an empty file (a save or copy that was cut off); pass a complete checkpoint."
    weights = ("give these weights to the model instead (lpl's models: --model.init_args.pretrained_path=PATH) or "
               "pass a checkpoint `lpl fit` saved")
    if path.suffix.lower() == ".safetensors":
        return f"{what} is a safetensors weights file, not a Lightning checkpoint with the training state; {weights}."
    try:
        checkpoint = _load_checkpoint(path)
    except Exception as error:  # noqa: BLE001 - any parse failure: said by kind below
        text = str(error)
        if "PytorchStreamReader" in text or "zip archive" in text:
            return (f"{what} is truncated or damaged (its zip archive is incomplete: a save or copy that was cut off); "
                    "pass a complete checkpoint.")
        refused = next((line.strip() for line in text.splitlines() if "Unsupported global" in line), None)
        if refused is not None:
            reason = refused.removeprefix("WeightsUnpickler error: ").split(" was not an allowed global")[0]
            return (f"{what} holds Python objects besides tensors and plain values ({reason}), which lpl does not "
                    "unpickle (that can run arbitrary code); pass a checkpoint `lpl fit` saved.")
        return (f"{what} could not be read as a checkpoint ({type(error).__name__}): it is no file torch.save wrote; "
                "pass a checkpoint `lpl fit` saved (a .ckpt file).")
    if isinstance(checkpoint, Mapping) and "state_dict" in checkpoint and "pytorch-lightning_version" in checkpoint:
        return None
    if isinstance(checkpoint, Mapping) and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return f"{what} holds a plain state dict (weights only), not a Lightning checkpoint; {weights}."
    return (f"{what} holds a {type(checkpoint).__name__} without Lightning's 'state_dict' and "
            "'pytorch-lightning_version' entries, not a Lightning checkpoint; pass a checkpoint `lpl fit` saved.")


def state_dict_mismatch(ours: Mapping[str, torch.Tensor], theirs: Mapping[str, torch.Tensor]) -> str | None:
    """How the state dict ``theirs`` (a file's) differs from a model's ``ours``: counts and the first keys and shapes
    of each kind, or None when every key and shape matches."""
    from lpl.utils.weights import state_dict_differences

    missing, unexpected, reshaped = state_dict_differences(ours, theirs)
    reshaped = [f"{k}: {tuple(theirs[k].shape)} in the file, {tuple(ours[k].shape)} in the model" for k in reshaped]
    parts = [f"{len(names)} {label} ({'; '.join(names[:2])}{'; ...' if len(names) > 2 else ''})"
             for label, names in (("missing", missing), ("unexpected", unexpected), ("in other shapes", reshaped))
             if names]
    return ", ".join(parts) or None


def _joined(outputs: list[Any]) -> dict[str, torch.Tensor]:
    """One dataloader's per-batch predict_step outputs (tensors, or dicts of tensors) joined along the batch: by key,
    a bare tensor under 'prediction'. TypeError for anything else."""
    columns: dict[str, list[torch.Tensor]] = {}
    for output in outputs:
        items = output.items() if isinstance(output, Mapping) else [("prediction", output)]
        for key, value in items:
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"predict_step returned a {type(value).__name__} under {key!r}, not a tensor")
            columns.setdefault(str(key), []).append(torch.atleast_1d(value.detach().cpu()))
    return {key: torch.cat(values) for key, values in columns.items()}
