"""The `lpl` command: every config fits for 2 steps; bad input exits 2 with a one-line message."""

import os
import re
import subprocess
import sys
from pathlib import Path

# lightning binds its log handler to the sys.stderr of the moment it is first imported: here, not inside a test,
# whose captured stream is closed afterwards ("--- Logging error ---" tracebacks in later tests' stderr)
import lightning  # noqa: F401
import pytest
import yaml
import timm
from PIL import Image
from safetensors.torch import save_file

from lpl.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SHORT = ["--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.val_check_interval=1",
         "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu"]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # configs write outputs/ relative to the working folder


def _fit(config: str, *extra: str) -> None:
    main(["fit", "--config", str(CONFIGS / config), *SHORT, *extra])


def _fake_imagenet(root: Path, classes: int = 2, per_class: int = 2) -> Path:
    for split in ("train", "val"):
        for cls in range(classes):
            folder = root / split / f"n{cls:08d}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (64, 64), color=(40 * i, 90, 30 * cls)).save(folder / f"{i}.JPEG")
    return root


def _error_of(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_mnist_vit_fits_twice_in_the_same_folder(capsys) -> None:
    _fit("mnist_vit.yaml")
    _fit("mnist_vit.yaml")  # an existing config.yaml must not stop a second run
    assert "final validation accuracy" in capsys.readouterr().out


def test_readme_prune_demo_prunes_fine_tunes_and_logs(capsys) -> None:
    """The README's main command, shortened: prune after the first step, W&B offline logger as configured."""
    import logging

    records: list[str] = []  # the callback reports through Lightning's rank-zero logger, whatever its handlers
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(handler)
    try:
        _fit("mnist_vit_prune.yaml", "--trainer.callbacks.init_args.prune_after_steps=1",
             "--trainer.callbacks.init_args.calib_batches=2")
    finally:
        logger.removeHandler(handler)
    report = "\n".join(records)
    assert "BlockPruneCallback: kept 0.50" in report and "predicted speedup" in report
    assert "finetuned_val_acc" in report and "final validation accuracy" in capsys.readouterr().out
    assert list(Path("outputs/mnist_vit_prune").rglob("prune_result/*.safetensors"))


def test_lm_text_fits(capsys) -> None:
    _fit("lm_text.yaml", "--data.init_args.seq_len=32")
    assert "val/ppl" in capsys.readouterr().out


@pytest.mark.parametrize("config,model_name", [("deit_s.yaml", "deit_small_patch16_224"),
                                               ("deit_b.yaml", "deit_base_patch16_224")])
def test_deit_configs_fit_on_an_imagenet_folder(tmp_path, config, model_name) -> None:
    root = _fake_imagenet(tmp_path / "imagenet")
    weights = tmp_path / "deit.safetensors"
    model = timm.create_model(model_name, pretrained=False, num_classes=2, img_size=64)  # 16 tokens: fast on CPU
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    _fit(
        config, f"--data.init_args.root={root}", "--data.init_args.batch_size=2", "--data.init_args.num_workers=0",
        "--data.init_args.eval_batch_size=2", f"--model.init_args.pretrained_path={weights}",
        "--model.init_args.num_classes=2", "--model.init_args.img_size=64", "--data.init_args.img_size=64",
        "--trainer.precision=32-true", "--trainer.devices=1",
    )


def test_missing_dataset_root_is_one_clear_line(tmp_path, capsys) -> None:
    err = _error_of(capsys, "fit", "--config", str(CONFIGS / "deit_s.yaml"), f"--data.init_args.root={tmp_path}/none",
                    "--model.init_args.pretrained_path=null")
    assert "dataset root" in err and "does not exist" in err and "Traceback" not in err


@pytest.mark.parametrize("config, setting, message", [
    ("mnist_vit.yaml", "--model.init_args.num_classes=5", "labels .* the model has 5 classes"),
    ("mnist_vit.yaml", "--model.init_args.img_size=32", r"\(28, 28\) images, the model takes \(32, 32\)"),
    ("mnist_vit.yaml", "--model.init_args.in_chans=3", "1-channel images, the model takes 3"),
    ("lm_text.yaml", "--model.init_args.vocab_size=100", "token ids .* vocabulary has 100"),
])
def test_a_model_that_does_not_fit_the_data_is_one_clear_line(capsys, config, setting, message) -> None:
    err = _error_of(capsys, "fit", "--config", str(CONFIGS / config), *SHORT, "--trainer.logger=false",
                    "--model.init_args.depth=1", setting)
    assert re.search(message, err) and "Traceback" not in err


@pytest.mark.parametrize("callback", ["lpl.prune.BlockPruneCallback", "lpl.order.TrainOrderRecorder"])
def test_a_second_lpl_callback_is_one_clear_line(tmp_path, capsys, callback) -> None:
    # Lightning refuses it when the Trainer is built, hinting at a unique state_key, which lpl would refuse next
    arguments = {"lpl.prune.BlockPruneCallback": {}, "lpl.order.TrainOrderRecorder": {"dirpath": str(tmp_path)}}
    entry = {"class_path": callback, "init_args": arguments[callback]}
    (tmp_path / "two.yaml").write_text(yaml.safe_dump({"trainer": {"callbacks": [entry, entry]}}))
    err = _error_of(capsys, "fit", "--config", str(CONFIGS / "mnist_vit.yaml"), "--config", str(tmp_path / "two.yaml"),
                    *SHORT, "--trainer.logger=false")
    assert f"a Trainer takes one {callback.rpartition('.')[2]}" in err and "Traceback" not in err


def test_not_an_imagenet_folder(tmp_path, capsys) -> None:
    (tmp_path / "flat").mkdir()
    err = _error_of(capsys, "fit", "--config", str(CONFIGS / "deit_s.yaml"), f"--data.init_args.root={tmp_path}/flat",
                    "--model.init_args.pretrained_path=null")
    assert "not an ImageNet-style folder" in err


def test_bad_pretrained_paths(tmp_path, capsys) -> None:
    root = _fake_imagenet(tmp_path / "imagenet")
    base = ["fit", "--config", str(CONFIGS / "deit_s.yaml"), f"--data.init_args.root={root}"]
    err = _error_of(capsys, *base, f"--model.init_args.pretrained_path={tmp_path}/nope.pth")
    assert "does not exist" in err
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    assert "not a readable weights file" in _error_of(capsys, *base, f"--model.init_args.pretrained_path={junk}")
    other = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("vit_tiny_patch16_224").state_dict().items()},
              str(other))
    assert "do not match the model" in _error_of(capsys, *base, f"--model.init_args.pretrained_path={other}")


def test_unknown_model_and_unknown_key(capsys) -> None:
    err = _error_of(capsys, "fit", "--config", str(CONFIGS / "mnist_vit.yaml"),
                    "--model.init_args.model_name=vit_tinny_patch16_224")
    assert "unknown timm model" in err and "vit_tiny_patch16_224" in err
    err = _error_of(capsys, "fit", "--config", str(CONFIGS / "mnist_vit.yaml"), "--model.init_args.embed_dimm=3")
    assert "embed_dimm" in err


def test_ddp_two_processes_fit_the_vit(tmp_path) -> None:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "lpl", "fit", "--config", str(CONFIGS / "mnist_vit.yaml"), *SHORT,
         "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.logger=false"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "final validation accuracy" in result.stdout


def test_ddp_spawn_prunes_in_the_spawned_processes(tmp_path) -> None:
    """ddp_spawn pickles the trainer, the CLI and its callbacks into the processes it starts."""
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "lpl", "fit", "--config", str(CONFIGS / "mnist_vit_prune.yaml"), *SHORT,
         "--trainer.devices=2", "--trainer.strategy=ddp_spawn", "--trainer.logger=false",
         "--trainer.callbacks.init_args.prune_after_steps=1", "--trainer.callbacks.init_args.calib_batches=2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "final validation accuracy" in result.stdout
    assert list(tmp_path.rglob("prune_result/masks.safetensors"))


def test_prune_command_saves_a_result(tmp_path, capsys) -> None:
    from lpl.prune import PruneResult

    out = tmp_path / "result"
    with pytest.raises(SystemExit) as exit_info, pytest.warns(UserWarning, match="freshly initialised weights"):
        main(["prune", "--config", str(CONFIGS / "mnist_vit.yaml"), "--flops_keep", "0.5", "--calib_batches", "2",
              "--out", str(out), "--model.init_args.embed_dim=64", "--trainer.logger=false"])
    assert exit_info.value.code == 0
    result = PruneResult.load(out)
    assert abs(result.flops_keep - 0.5) <= 0.01
    assert "predicted speedup" in capsys.readouterr().out


def test_prune_command_refuses_a_checkpoint_of_another_model_and_an_output_path_taken_by_a_file(tmp_path, capsys):
    from lpl.models import ViTClassifier
    from lpl.utils.io import save_safetensors_atomic

    other = ViTClassifier(img_size=28, patch_size=7, in_chans=1, num_classes=5, embed_dim=64, depth=1, num_heads=2)
    save_safetensors_atomic({f"model.{k}": v for k, v in other.model.state_dict().items()},
                            tmp_path / "other.safetensors")
    base = ["prune", "--config", str(CONFIGS / "mnist_vit.yaml"), "--model.init_args.embed_dim=64",
            "--model.init_args.depth=1", "--trainer.logger=false"]
    for extra, message in ((["--ckpt_path", str(tmp_path / "other.safetensors")], "other shapes"),
                           (["--ckpt_path", str(tmp_path / "none.ckpt")], "--ckpt_path .* does not exist")):
        with pytest.raises(SystemExit) as exit_info:
            main([*base, *extra, "--out", str(tmp_path / "out")])
        assert exit_info.value.code == 2
        assert re.search(message, capsys.readouterr().err)
    (tmp_path / "taken").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        main([*base, "--out", str(tmp_path / "taken" / "result")])
    assert exit_info.value.code == 2 and "is a file, not a folder" in capsys.readouterr().err


def test_python_m_lpl_names_itself_lpl() -> None:
    done = subprocess.run([sys.executable, "-m", "lpl", "fit", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("usage: lpl [options] fit")


def test_a_run_recorded_through_the_cli_is_retrained_exactly() -> None:
    from lpl.order import Recording, retrain

    _fit("mnist_vit.yaml", "--trainer.logger=false", "--trainer.callbacks+=lpl.order.TrainOrderRecorder",
         "--trainer.callbacks.dirpath=rec", "--trainer.callbacks.proj_dim=16", "--trainer.callbacks.curvature_rank=0",
         "--model.init_args.embed_dim=32", "--model.init_args.depth=1", "--model.init_args.num_heads=2",
         "--data.init_args.val_size=64")
    recording = Recording.open("rec")
    # LightningCLI adds how it built each class to its hyperparameters: not constructor arguments
    assert not {"_class_path", "_instantiator"} & set(recording.manifest["model"]["hparams"])
    result = retrain("rec", recording.order, curve_every_n_steps=len(recording.order), accelerator="cpu")
    assert result.final_loss == pytest.approx(recording.probe_scalars["val_loss"][-1], abs=1e-5)


def test_help_lists_the_method_commands_too(capsys) -> None:
    from lpl.cli import HELPER_COMMANDS

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "fit" in out and all(f"  {name} " in out for name in HELPER_COMMANDS)


def test_lightnings_refusals_of_user_input_are_one_clear_line(tmp_path, capsys) -> None:
    """A missing or unreadable checkpoint and a Trainer setting Lightning refuses ended in tracebacks."""
    base = ["fit", "--config", str(CONFIGS / "mnist_vit.yaml"), *SHORT, "--trainer.logger=false",
            "--model.init_args.depth=1"]
    err = _error_of(capsys, *base, f"--ckpt_path={tmp_path}/none.ckpt")
    assert "none.ckpt" in err and "give --ckpt_path an existing checkpoint" in err and "Traceback" not in err
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_text("not a checkpoint")
    err = _error_of(capsys, *base, f"--ckpt_path={garbage}")
    assert "could not be read" in err and "Traceback" not in err
    err = _error_of(capsys, *base, "--trainer.max_epochs=-5")
    assert "max_epochs" in err and "Traceback" not in err


def test_an_unknown_command_names_the_method_commands_and_the_nearest_one(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["prnue", "--config", "x.yaml"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "position-map" in err and "did you mean 'prune'" in err


def test_ckpt_path_last_resumes_the_previous_run(tmp_path) -> None:
    """Checkpoints went under each run's own W&B id, so `--ckpt_path last` found none and trained from scratch."""
    import torch

    args = ["--config", str(CONFIGS / "mnist_vit.yaml"), "--trainer.limit_val_batches=1", "--trainer.logger=false",
            "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu", "--model.init_args.depth=1",
            "--trainer.limit_train_batches=2"]
    main(["fit", *args, "--trainer.max_epochs=1"])
    main(["fit", *args, "--trainer.max_epochs=2", "--ckpt_path=last"])
    lasts = sorted(Path("outputs/mnist_vit/checkpoints").glob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
    state = torch.load(lasts[-1], map_location="cpu", weights_only=False)  # our own file, written just now
    assert state["global_step"] == 4 and state["epoch"] == 1


def test_prune_command_takes_the_configs_pruning_options_and_both_flag_spellings(tmp_path, capsys) -> None:
    """`lpl prune` ignored the config's BlockPruneCallback (flops_keep 0.3 and fc1 only were pruned at 0.5 over
    every layer), spelled its flags only one way, and answered a misspelt flag with the Trainer's usage."""
    from lpl.prune import PruneResult

    base = ["prune", "--config", str(CONFIGS / "mnist_vit_prune.yaml"), "--calib-batches", "2",
            "--model.init_args.embed_dim=64", "--model.init_args.depth=1", "--trainer.logger=false",
            "--trainer.callbacks.init_args.flops_keep=0.3", '--trainer.callbacks.init_args.include=["*.fc1"]']
    with pytest.raises(SystemExit) as exit_info:
        main([*base, "--out", str(tmp_path / "from_config")])
    assert exit_info.value.code == 0
    result = PruneResult.load(tmp_path / "from_config")
    assert abs(result.flops_keep - 0.3) <= 0.01 and all(name.endswith("fc1") for name in result.block_masks)
    with pytest.raises(SystemExit):
        main([*base, "--flops-keep", "0.5", "--block_size", "8", "--out", str(tmp_path / "flags")])
    result = PruneResult.load(tmp_path / "flags")
    assert abs(result.flops_keep - 0.5) <= 0.01 and result.block_size == (8, 8)
    capsys.readouterr()
    err = _error_of(capsys, *base, "--flops-kep", "0.6", "--out", str(tmp_path / "typo"))
    assert "usage: lpl prune" in err and "unrecognized arguments: --flops-kep" in err


def test_the_callbacks_layer_selection_is_checked_at_fit_start(capsys) -> None:
    """Patterns matching no layer were refused only when pruning began, after prune_after_steps of training."""
    err = _error_of(capsys, "fit", "--config", str(CONFIGS / "mnist_vit_prune.yaml"), *SHORT, "--trainer.logger=false",
                    "--model.init_args.depth=1", '--trainer.callbacks.init_args.include=["*.nomatch"]',
                    "--trainer.callbacks.init_args.block_size=8")
    assert "match no Linear layer" in err and "Epoch 0" not in err


def test_ckpt_path_best_in_a_new_process_reads_the_best_checkpoint_the_run_recorded(tmp_path, capsys, caplog) -> None:
    """Lightning knows the best checkpoint only in the process that trained: `lpl validate --ckpt_path best` ended in
    a ValueError traceback."""
    args = ["--config", str(CONFIGS / "mnist_vit.yaml"), "--trainer.limit_val_batches=1", "--trainer.logger=false",
            "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu", "--model.init_args.depth=1"]
    err = _error_of(capsys, "validate", *args, "--ckpt_path=best")  # no run yet
    assert "--ckpt_path best: a new process reads the best checkpoint" in err and "Traceback" not in err
    main(["fit", *args, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2"])
    capsys.readouterr()
    main(["validate", *args, "--ckpt_path=best"])
    assert "validate metrics:" in capsys.readouterr().out
    assert "Restoring states from the checkpoint path" in caplog.text and "epoch=0-step=2.ckpt" in caplog.text
    # a fresh run in the same folder writes last-v1.ckpt: its best, not the first run's
    main(["fit", *args, "--trainer.max_epochs=1", "--trainer.limit_train_batches=3"])
    caplog.clear()
    main(["validate", *args, "--ckpt_path=best"])
    assert "epoch=0-step=3.ckpt" in caplog.text and "epoch=0-step=2.ckpt" not in caplog.text


def test_a_fit_ending_after_its_last_validation_says_which_step_was_validated(capsys) -> None:
    main(["fit", "--config", str(CONFIGS / "mnist_vit.yaml"), "--trainer.max_steps=3", "--trainer.limit_val_batches=1",
          "--trainer.val_check_interval=2", "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu",
          "--trainer.logger=false", "--model.init_args.depth=1"])
    out = capsys.readouterr().out
    assert "validation accuracy at step 2 (the last validation; training ended at step 3)" in out
    assert "final validation accuracy" not in out
