"""The `lpl` command's answers to unusable input: one line saying what was wrong and what to do, not a traceback;
and what its commands report (pruned FLOPs, devices, predictions, which step the metrics are from)."""

import os
import shutil
import warnings
from pathlib import Path

# lightning binds its log handler to the sys.stderr of the moment it is first imported (see test_cli.py)
import lightning  # noqa: F401
import pytest
import torch

from lpl.cli import _user_error, main
from lpl.utils.errors import LplError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu",
         "--trainer.limit_val_batches=1"]
# the model of the run the `run` fixture saves; the config's own model is larger (embed 128, depth 4)
SMALL = ["--model.init_args.embed_dim=32", "--model.init_args.depth=1", "--model.init_args.num_heads=2"]
MNIST = ["--config", str(CONFIGS / "mnist_vit.yaml"), *QUIET]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # configs write outputs/ relative to the working folder


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A folder holding outputs/mnist_vit/checkpoints of a one-step fit of the SMALL model."""
    folder = tmp_path_factory.mktemp("run")
    here = os.getcwd()
    os.chdir(folder)
    try:
        main(["fit", *MNIST, *SMALL, "--trainer.max_steps=1"])
    finally:
        os.chdir(here)
    return folder


def _checkpoint(run: Path) -> Path:
    return run / "outputs/mnist_vit/checkpoints/last.ckpt"


def _error_of(capsys, *argv: str) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def _tiny_vit():
    from lpl.models import ViTClassifier

    torch.manual_seed(0)
    return ViTClassifier(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=1, num_heads=2)


def _batches() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [{"image": torch.randn(8, 1, 28, 28, generator=generator), "label": torch.randint(0, 10, (8,)),
             "index": torch.arange(8)} for _ in range(2)]


def test_pruning_a_model_whose_layers_hold_zero_blocks_warns_that_the_budget_counts_them_kept() -> None:
    """`lpl prune` of a block-pruned checkpoint reported 0.695 of the FLOPs kept where the blocks holding weights were
    0.499, without a word."""
    from lpl.prune import prune_model

    model = _tiny_vit()
    fc1 = model.model.blocks[0].mlp.fc1  # 128 x 32: 16 x 4 blocks of 8 x 8
    options = dict(block_size=(8, 8), flops_keep=0.5, include=["*.fc1"], calib_batches=2, importance="magnitude")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # trained or fresh weights: no exact-zero blocks
        warnings.filterwarnings("ignore", message="prune_model: the cost model predicts")  # 8x8 blocks
        prune_model(model, _batches(), **options)
        with torch.no_grad():  # a layer initialised to zero: its zero blocks are its zero weights, by chance
            saved = fc1.weight.clone()
            fc1.weight.zero_()
        prune_model(model, _batches(), **options)
    with torch.no_grad():
        fc1.weight.copy_(saved)
        fc1.weight[:64] = 0  # half its blocks pruned before
    with pytest.warns(UserWarning, match=r"already hold whole blocks of exact zeros.*50\.0% of their 8x8 blocks.*"
                                         r"counts those blocks as kept.*flops_keep=0\.250 keeps 0\.5 of it"):
        prune_model(model, _batches(), **options)


def test_prune_calibrates_on_the_trainers_device(tmp_path, monkeypatch) -> None:
    """`lpl prune` left the model on the CPU whatever device the config's Trainer runs on (analytic-cpu costs on a
    GPU machine). No GPU here: the Trainer's device is faked as 'meta', which any model moves to."""
    import lpl.prune.api
    from lightning.pytorch.strategies import SingleDeviceStrategy

    seen = {}

    def record(model, *args, **kwargs):
        seen["device"] = next(model.parameters()).device
        raise LplError("recorded")

    monkeypatch.setattr(lpl.prune.api, "prune_model", record)
    monkeypatch.setattr(SingleDeviceStrategy, "root_device", property(lambda self: torch.device("meta")))
    with pytest.raises(SystemExit), pytest.warns(UserWarning, match="freshly initialised weights"):
        main(["prune", *MNIST, *SMALL, "--out", str(tmp_path / "r")])
    assert seen["device"].type == "meta"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_gpu_config_on_a_machine_without_one_says_to_pass_the_cpu_accelerator(capsys) -> None:
    for accelerator in ("gpu", "cuda"):
        err = _error_of(capsys, "prune", "--config", str(CONFIGS / "mnist_vit.yaml"), "--trainer.logger=false",
                        f"--trainer.accelerator={accelerator}")
        assert "Pass --trainer.accelerator=cpu" in err


@pytest.mark.parametrize("command", ["validate", "fit"])
def test_last_checkpoint_of_another_model_size_is_one_line_naming_the_differences(run, tmp_path, capsys, command):
    """A 57-line RuntimeError traceback from load_state_dict."""
    shutil.copytree(run / "outputs", tmp_path / "outputs")
    err = _error_of(capsys, command, *MNIST, "--trainer.max_steps=2", "--ckpt_path=last")  # the config's model
    assert "holds the weights of another model than the config's" in err
    assert "36 missing (model.blocks.1.norm1.weight" in err
    assert "in other shapes (model.pos_embed: (1, 16, 32) in the file, (1, 16, 128) in the model" in err
    assert f"pass the file itself (--ckpt_path={tmp_path.resolve()}/outputs/mnist_vit/checkpoints/last.ckpt)" in err


@pytest.mark.parametrize("kind, message", [
    ("folder", "is a folder; pass a checkpoint file in it"),
    ("empty", "is an empty file"),
    ("truncated", "is truncated or damaged"),
    ("state dict", "holds a plain state dict (weights only), not a Lightning checkpoint; give these weights to the "
                   "model instead (lpl's models: --model.init_args.pretrained_path=PATH)"),
    ("safetensors", "is a safetensors weights file, not a Lightning checkpoint"),
])
@pytest.mark.parametrize("command", ["validate", "fit"])
def test_a_ckpt_path_that_is_no_lightning_checkpoint_is_one_line_saying_what_it_is(run, tmp_path, capsys, command,
                                                                                   kind, message) -> None:
    """A folder, an empty file, a truncated checkpoint and a plain state dict ended in tracebacks."""
    from lpl.utils.io import save_safetensors_atomic

    names = {"folder": "ckpts", "state dict": "weights.pth", "safetensors": "w.safetensors"}
    path = tmp_path / names.get(kind, "x.ckpt")
    if kind == "folder":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(_checkpoint(run).read_bytes()[:100_000])
    elif kind == "state dict":
        torch.save({"w": torch.zeros(2)}, path)
    else:
        save_safetensors_atomic({"w": torch.zeros(2)}, path)
    err = _error_of(capsys, command, *MNIST, *SMALL, "--trainer.max_steps=2", f"--ckpt_path={path}")
    assert f"--ckpt_path {str(path)!r} {message}" in err


def test_prune_takes_the_networks_own_weights_and_last(run, tmp_path, capsys) -> None:
    """`lpl prune --ckpt_path dense.safetensors` (keys without the LightningModule's 'model.') was refused as not
    matching the config's model; `--ckpt_path last` was read as a file name."""
    from lpl.models import ViTClassifier
    from lpl.prune import PruneResult
    from lpl.utils.io import save_safetensors_atomic

    shutil.copytree(run / "outputs", tmp_path / "outputs")
    network = ViTClassifier(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=1, num_heads=2,
                            model_kwargs={"global_pool": "avg", "class_token": False}).model
    save_safetensors_atomic(network.state_dict(), tmp_path / "dense.safetensors")
    base = ["prune", *MNIST, *SMALL, "--calib_batches", "2", "--block_size", "8"]
    for ckpt in (str(tmp_path / "dense.safetensors"), "last"):
        with pytest.raises(SystemExit) as exit_info:
            main([*base, "--ckpt_path", ckpt, "--out", str(tmp_path / "result")])
        assert exit_info.value.code == 0
        assert PruneResult.load(tmp_path / "result").options["profile"] == "analytic-cpu"  # this machine's CPU
    other = ViTClassifier(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=64, depth=1, num_heads=2,
                          model_kwargs={"global_pool": "avg", "class_token": False}).model
    save_safetensors_atomic(other.state_dict(), tmp_path / "other.safetensors")
    err = _error_of(capsys, *base, "--ckpt_path", str(tmp_path / "other.safetensors"), "--out", str(tmp_path / "o"))
    assert "does not match its network 'model' (" in err and "pos_embed: (1, 16, 64) in the file" in err
    (tmp_path / "outputs").rename(tmp_path / "moved")
    err = _error_of(capsys, *base, "--ckpt_path", "last", "--out", str(tmp_path / "o"))
    assert "--ckpt_path last:" in err and "holds no last checkpoint" in err


class _Broken(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        raise LplError("cannot read image 3.JPEG: truncated; remove or replace the file.")


def test_an_lpl_error_in_a_dataloader_worker_is_its_own_message() -> None:
    """torch re-raises it as "Caught LplError in DataLoader worker process 0. Original Traceback ..." (24 lines)."""
    batches = iter(torch.utils.data.DataLoader(_Broken(), batch_size=2, num_workers=1))
    try:
        next(batches)
    except LplError as caught:
        error = caught.with_traceback(None)  # its frames would keep the worker running to the end of the test
    else:
        pytest.fail("the worker raised nothing")
    del batches
    assert "Original Traceback" in str(error)
    assert _user_error(error) == "cannot read image 3.JPEG: truncated; remove or replace the file."


@pytest.mark.parametrize("mode, message", [("", "WANDB_MODE is set but empty: unset it"),
                                           ("ofline", "WANDB_MODE='ofline' is not a W&B mode (did you mean "
                                                      "'offline'?): set one of online, offline")])
def test_a_wandb_mode_wandb_refuses_is_one_line_before_any_work(tmp_path, capsys, monkeypatch, mode, message):
    """wandb refused it with a 50-line pydantic traceback when the logger started, after the command's work."""
    monkeypatch.setenv("WANDB_MODE", mode)
    err = _error_of(capsys, "fit", "--config", str(CONFIGS / "mnist_vit.yaml"), "--trainer.max_steps=1",
                    "--trainer.limit_val_batches=1", "--trainer.accelerator=cpu", *SMALL)
    assert message in err and not (tmp_path / "outputs").exists()
    from lpl.utils.loggers import check_wandb_mode

    for accepted in ("online", "offline", "disabled", "dryrun", "run", "shared"):
        monkeypatch.setenv("WANDB_MODE", accepted)
        check_wandb_mode()


def test_devices_this_build_cannot_run_are_refused() -> None:
    """`--device meta` and `--device mps` passed the check and failed later with tracebacks."""
    from lpl.utils.cli_args import checked_device

    assert checked_device("cpu") == torch.device("cpu")
    with pytest.raises(LplError, match=r"--device 'meta': this runs on cpu or cuda \(a meta device holds"):
        checked_device("meta")
    with pytest.raises(LplError, match="--device 'meta'"):
        checked_device("meta", ("cpu", "meta"))  # never runnable, whoever allows it
    for other in ("mps", "xpu"):
        with pytest.raises(LplError, match=f"--device '{other}': this runs on cpu or cuda"):
            checked_device(other)
    if not torch.backends.mps.is_available():
        with pytest.raises(LplError, match="this machine or its torch build cannot run mps; use --device cpu"):
            checked_device("mps", ("cpu", "mps"))


def test_predict_writes_the_predictions_and_says_where(run, capsys) -> None:
    """`lpl predict` computed the predictions and threw them away."""
    from safetensors.torch import load_file

    main(["predict", *MNIST, *SMALL, "--trainer.limit_predict_batches=2", "--data.init_args.eval_batch_size=8",
          f"--ckpt_path={_checkpoint(run)}"])
    path = Path("outputs/mnist_vit/predictions.safetensors")
    assert f"predictions of 16 samples (index, prediction, probability) written to {path}" in capsys.readouterr().out
    predictions = load_file(path)
    assert predictions["index"].shape == predictions["prediction"].shape == (16,)
    assert predictions["probability"].shape == (16, 10)
    assert torch.allclose(predictions["probability"].sum(-1), torch.ones(16))


def test_predict_refuses_a_folder_where_its_file_goes_before_predicting(run, capsys) -> None:
    """A folder at outputs/<config>/predictions.safetensors ended in a raw IsADirectoryError after predicting."""
    Path("outputs/mnist_vit/predictions.safetensors").mkdir(parents=True)
    err = _error_of(capsys, "predict", *MNIST, *SMALL, "--trainer.limit_predict_batches=1",
                    f"--ckpt_path={_checkpoint(run)}")
    assert "lpl predict writes outputs/mnist_vit/predictions.safetensors, but a folder is there" in err
    assert "predictions of" not in capsys.readouterr().out  # refused before predicting


def test_a_fit_ending_after_its_last_validation_says_so_without_an_accuracy_too(capsys) -> None:
    """lm_text logs no val/acc, and its metrics from step 2 were printed as a fit ending at step 3's."""
    main(["fit", "--config", str(CONFIGS / "lm_text.yaml"), *QUIET, "--trainer.max_steps=3",
          "--trainer.val_check_interval=2", "--data.init_args.seq_len=16", "--data.init_args.batch_size=2",
          "--model.init_args.depth=1"])
    assert "fit metrics at step 2 (the last validation; training ended at step 3): val/loss=" in capsys.readouterr().out


def test_a_seed_numpy_does_not_take_is_one_line(capsys) -> None:
    err = _error_of(capsys, "fit", *MNIST, "--seed_everything=99999999999999999999")
    assert "--seed_everything 99999999999999999999 is out of range: seeds go from 0 to 4294967295" in err
