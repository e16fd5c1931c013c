"""A run SIGKILLed at random instants and resumed from its last checkpoint records exactly what an uninterrupted
run records, byte for byte (fp32 storage, deterministic CPU training)."""

import random
import subprocess
import sys
from pathlib import Path

import pytest
import recorder_support
import torch

from lpl.order import Recording

SCRIPT = Path(__file__).with_name("recorder_support.py")
HOOKS = ("batch_start", "before_optimizer_step", "batch_end")


def _run(tmp: Path, name: str, *extra: str, workers: int = 0) -> int:
    cmd = [sys.executable, str(SCRIPT), "--dirpath", str(tmp / name / "rec"), "--ckpt-dir", str(tmp / name / "ckpt"), *extra]
    env = {"OMP_NUM_THREADS": "1", "PATH": "", "TINY_WORKERS": str(workers)}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    if done.returncode not in (0, -9):
        raise AssertionError(done.stderr[-3000:])
    return done.returncode


def _shard_digests(rec: Recording) -> list:
    return [(p["t"], [s["sha256"] for s in p["shards"]], {k: v for k, v in p.items() if k != "shards"}) for p in rec.manifest["probes"]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, in this process (same seeds, one thread: the same bits as a subprocess)."""
    tmp = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    recorder_support.main(["--dirpath", str(tmp / "rec"), "--ckpt-dir", str(tmp / "ckpt")])
    torch.set_num_threads(threads)
    return Recording.open(tmp / "rec")


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, reference):
    """Two crashes in one 10-step run (6 batches per epoch, checkpoints every 2 steps): mid-epoch, then around the
    epoch boundary or in the second epoch, each in a random hook. A loader worker prefetches batches, so the sampler's own
    position runs ahead of training; the recorder pins the checkpoint to the batches actually trained."""
    rng = random.Random(4)
    kills = [rng.randint(1, 5), rng.randint(6, 9)]
    for step in kills:
        hook = rng.choice(HOOKS)
        resume = ["--resume"] if (tmp_path / "run" / "rec").exists() else []
        assert _run(tmp_path, "run", "--kill-at", f"{step}:{hook}", *resume, workers=1) == -9, f"no kill at {step}:{hook}"
        crashed = Recording.open(tmp_path / "run" / "rec")
        crashed.verify()  # whatever instant it died at, what the manifest names is whole
        assert crashed.status == "recording"
    assert _run(tmp_path, "run", "--resume", workers=1) == 0
    resumed = Recording.open(tmp_path / "run" / "rec")
    resumed.verify()
    assert resumed.status == "complete"
    assert resumed.manifest["steps"] == reference.manifest["steps"]
    assert resumed.order == reference.order and resumed.batches == reference.batches
    assert _shard_digests(resumed) == _shard_digests(reference)
    assert resumed.manifest["initial_state"]["sha256"] == reference.manifest["initial_state"]["sha256"]
