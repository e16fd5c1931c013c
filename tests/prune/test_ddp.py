"""Two gloo processes: all-reduced calibration statistics and identical masks on both ranks."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lpl.prune.importance import collect_statistics
from lpl.utils.loss import module_loss


SCRIPT = Path(__file__).with_name("ddp_prune_script.py")
ROOT = Path(__file__).resolve().parents[2]



@pytest.mark.parametrize("passes", ["single", "grouped"])
def test_ddp_ranks_reduce_statistics_and_share_masks(tmp_path, passes):
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), passes], env=env, capture_output=True, text=True,
                         timeout=240, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert ("calibration pass 1/" in run.stdout + run.stderr) == (passes == "grouped")
    rank0, rank1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    masks = [k for k in rank0 if k.startswith("mask/")]
    assert masks and all(torch.equal(rank0[k], rank1[k]) for k in masks)
    assert 0.3 < float(torch.cat([rank0[k].flatten().float() for k in masks]).mean()) < 0.7
    for key in ("first", "gram", "grad_sq_mean"):
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0)
    assert (tmp_path / "result" / "masks.safetensors").is_file()
    # rank 0 alone, inside single_process(), pruned as one process does (it waited on rank 1 in a collective before)
    from lpl.prune import PruneResult, prune_model

    sys.path.insert(0, str(SCRIPT.parent))
    from ddp_prune_script import rank_batches, tiny_classifier

    alone = PruneResult.load(tmp_path / "alone")
    torch.manual_seed(0)
    expected = prune_model(tiny_classifier(), rank_batches(0), block_size=(8, 8), flops_keep=0.5)
    assert all(torch.equal(alone.block_masks[n], expected.block_masks[n]) for n in expected.block_masks)
    # the reduced statistics equal a single process's statistics over both ranks' batches
    model = tiny_classifier()
    model.model.load_state_dict({k[len("state/"):]: v for k, v in rank0.items() if k.startswith("state/")})
    single = collect_statistics(model, {"fc1": model.model.blocks[0].mlp.fc1}, rank_batches(0) + rank_batches(1),
                                (8, 8), module_loss)["fc1"]
    torch.testing.assert_close(rank0["first"], single.first, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(rank0["gram"], single.gram, rtol=1e-5, atol=1e-9)


def test_figures_measured_under_distributed_samplers_are_the_whole_validation_sets(tmp_path):
    """Loaders given to fit() get Lightning's distributed samplers: once validation ran, each rank's loader holds
    half the set, and the fine-tuned figures differed between ranks (each its half's)."""
    import json

    from lpl.data.mnist import MNIST5kDataModule
    from lpl.prune import PruneResult, apply_masks

    sys.path.insert(0, str(SCRIPT.parent))
    from ddp_prune_script import tiny_classifier

    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "evaluate"], env=env, capture_output=True,
                         text=True, timeout=240, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"metrics{r}.json").read_text()) for r in (0, 1))
    assert set(rank0) >= {"prune/dense_val_loss", "prune/finetuned_val_loss"} and rank0 == rank1
    model = tiny_classifier()
    model.load_state_dict(load_file(str(tmp_path / "final.safetensors")))
    apply_masks(model, PruneResult.load(tmp_path / "result"))
    data = MNIST5kDataModule(batch_size=16, val_size=100)
    data.setup("fit")
    with torch.no_grad():
        model.eval()
        batch = next(iter(torch.utils.data.DataLoader(data.val_set, batch_size=100)))
        whole = float(module_loss(model, batch))
    assert rank0["prune/finetuned_val_loss"] == pytest.approx(whole, rel=1e-5)
