"""Recording under DDP (2 gloo processes) equals a single-process recording.

Each rank probes every other pool batch of the full global batches and writes its own shards; the merged steps
match the single-process run up to float32 reduction order (DDP averages the two half-batch gradients with an
all-reduce, a single process averages the whole batch at once): we allow 1e-5 relative to each tensor's largest
entry (measured: <= 4e-7 after 10 steps). A process that ran a DDP fit keeps its process group: one-device
recording and retraining there must still run as one process.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import recorder_support
import torch

from lpl.order import Recording

SCRIPT = Path(__file__).with_name("recorder_support.py")


def _same_probes(one: Recording, two: Recording, rtol: float) -> None:
    """Every probed step holds the same tensors, up to ``rtol`` of each tensor's largest entry."""
    for t in one.probe_steps:
        a, b = one.step(t), two.step(t)
        assert a.keys() == b.keys()
        for name in a:
            scale = a[name].abs().max().clamp_min(1e-12)
            assert ((a[name] - b[name]).abs().max() / scale).item() <= rtol, (t, name)


def _run(*arguments: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(SCRIPT), *arguments], capture_output=True, text=True, timeout=180,
                          env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_gloo_ranks_record_what_one_process_records(tmp_path):
    threads = torch.get_num_threads()
    recorder_support.main(["--dirpath", str(tmp_path / "one" / "rec"), "--ckpt-dir", str(tmp_path / "one" / "ckpt")])
    torch.set_num_threads(threads)
    _run("--dirpath", str(tmp_path / "two" / "rec"), "--ckpt-dir", str(tmp_path / "two" / "ckpt"), "--devices", "2")
    one, two = Recording.open(tmp_path / "one" / "rec"), Recording.open(tmp_path / "two" / "rec")
    two.verify()
    assert two.status == "complete" and two.manifest["world_size"] == 2
    assert all(len(p["shards"]) == 2 for p in two.manifest["probes"])  # each rank wrote its share
    assert two.order == one.order and two.batches == one.batches and two.probe_steps == one.probe_steps
    assert two.scalars == one.scalars
    _same_probes(one, two, rtol=1e-5)


def test_bfloat16_weights_under_ddp_are_not_taken_for_rewritten_gradients(tmp_path):
    """DDP sums bfloat16 gradients in bfloat16: the recorder's float32 average of the ranks' gradients differs by that
    rounding (1.6e-3 of their norm), which is no rewrite."""
    _run("--dirpath", str(tmp_path / "rec"), "--ckpt-dir", str(tmp_path / "ckpt"), "--devices", "2",
         "--precision", "bf16-true", "--max-steps", "3", "--probe-every", "1")
    assert Recording.open(tmp_path / "rec").status == "complete"


@pytest.mark.parametrize("model", [[], ["--metrics"]], ids=["plain", "torchmetrics"])
def test_a_one_device_recording_after_a_ddp_fit_in_the_same_process_records_whole_batches(tmp_path, model):
    # the DDP fit leaves its 2-rank process group initialised; a one-device Trainer recording next in rank 0 must
    # record what a fresh process records (whole batches, every pool batch probed by this one process), and
    # MetricNet's accuracy must not gather over that group (rank 1 has exited)
    threads = torch.get_num_threads()
    recorder_support.main(["--dirpath", str(tmp_path / "fresh"), "--ckpt-dir", str(tmp_path / "fresh-ckpt"),
                           "--max-steps", "4", *model])
    torch.set_num_threads(threads)
    done = _run("--dirpath", str(tmp_path / "ddp"), "--ckpt-dir", str(tmp_path / "ckpt"), "--devices", "2",
                "--max-steps", "4", "--then-record", str(tmp_path / "after"), *model)
    assert "after the one-device fit: (0, 2)" in done.stdout  # the one-process view ended with that fit
    fresh, after = Recording.open(tmp_path / "fresh"), Recording.open(tmp_path / "after")
    after.verify()
    assert after.status == "complete" and after.manifest["world_size"] == 1
    assert all(len(p["shards"]) == 1 for p in after.manifest["probes"])
    assert after.order == fresh.order and after.batches == fresh.batches and after.scalars == fresh.scalars
    _same_probes(fresh, after, rtol=0.0)


@pytest.mark.parametrize("model", [[], ["--metrics"]], ids=["plain", "torchmetrics"])
def test_retraining_after_a_ddp_fit_in_the_same_process_trains_whole_batches(tmp_path, model):
    # the DDP fit leaves its process group initialised; the one-process retraining Trainer and record_sensitivities'
    # re-run must still train every batch whole (they trained rank 0's half of each) and end where the run ended;
    # MetricNet's accuracy, computed at the epoch's end, must not gather over that group (rank 1 has exited)
    done = _run("--dirpath", str(tmp_path / "rec"), "--ckpt-dir", str(tmp_path / "ckpt"), "--devices", "2",
                "--max-steps", "4", "--then-retrain", *model)
    retrained, rerun = (float(word) for word in done.stdout.split("retrained ")[1].split()[::2])
    recorded = Recording.open(tmp_path / "rec").probe_scalars["val_loss"][-1]
    assert retrained == pytest.approx(recorded, rel=1e-5) and rerun == pytest.approx(recorded, rel=1e-5)
