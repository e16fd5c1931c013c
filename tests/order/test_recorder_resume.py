"""A run SIGKILLed at random instants and resumed from its last checkpoint records exactly what an uninterrupted
run records, byte for byte (fp32 storage, deterministic CPU training), with dropout too: Lightning checkpoints restore
no random generators, so the recorder puts back those the interrupted run's next step started from."""

import hashlib
import random
import subprocess
import sys
from pathlib import Path

import pytest
import recorder_support
import torch

from lpl.order import Recording
from lpl.order.store import RecordingError

SCRIPT = Path(__file__).with_name("recorder_support.py")
HOOKS = ("batch_start", "before_optimizer_step", "batch_end")


def _run(tmp: Path, name: str, *extra: str, workers: int = 0) -> int:
    cmd = [sys.executable, str(SCRIPT), "--dirpath", str(tmp / name / "rec"), "--ckpt-dir", str(tmp / name / "ckpt"),
           *extra]
    env = {"OMP_NUM_THREADS": "1", "PATH": "", "TINY_WORKERS": str(workers)}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    if done.returncode not in (0, -9):
        raise AssertionError(done.stderr[-3000:])
    return done.returncode


def _shard_digests(rec: Recording) -> list:
    return [(p["t"], [s["sha256"] for s in p["shards"]], {k: v for k, v in p.items() if k != "shards"})
            for p in rec.manifest["probes"]]


def _rng_states(rec: Recording) -> dict:
    return {t: {name: hashlib.sha256(state.numpy().tobytes()).hexdigest() for name, state in states.items()}
            for t, states in rec.rng_states().items()}


@pytest.mark.parametrize("dropout, workers", [(0.0, 1), (0.3, 0)], ids=["prefetching-loader", "dropout"])
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, monkeypatch, dropout, workers):
    """Two crashes in one 10-step run (6 batches per epoch, checkpoints every 2 steps): mid-epoch, then around the
    epoch boundary or in the second epoch, each in a random hook. A loader worker prefetches batches, so the sampler's
    own position runs ahead of training; the recorder pins the checkpoint to the batches actually trained. With
    dropout every resumed step must draw the uninterrupted run's masks: mid-epoch from the generator states the last
    trained step left (the checkpoint holds them); at a new epoch, whose loader (no workers) drew its seed from the
    generators between the steps, from the states the interrupted run stored for that step."""
    # the uninterrupted run, in this process (same seeds, one thread: the same bits as a subprocess)
    monkeypatch.setenv("TINY_WORKERS", str(workers))
    threads = torch.get_num_threads()
    model = ["--dropout", str(dropout)]
    recorder_support.main(["--dirpath", str(tmp_path / "ref" / "rec"), "--ckpt-dir", str(tmp_path / "ref" / "ckpt"),
                           *model])
    torch.set_num_threads(threads)
    reference = Recording.open(tmp_path / "ref" / "rec")
    rng = random.Random(4)
    kills = [rng.randint(1, 5), rng.randint(6, 9)]
    for step in kills:
        hook = rng.choice(HOOKS)
        resume = ["--resume"] if (tmp_path / "run" / "rec").exists() else []
        assert _run(tmp_path, "run", "--kill-at", f"{step}:{hook}", *resume, *model, workers=workers) == -9, (
            f"no kill at {step}:{hook}")
        crashed = Recording.open(tmp_path / "run" / "rec")
        crashed.verify()  # whatever instant it died at, what the manifest names is whole
        assert crashed.status == "recording"
    assert _run(tmp_path, "run", "--resume", *model, workers=workers) == 0
    resumed = Recording.open(tmp_path / "run" / "rec")
    resumed.verify()
    assert resumed.status == "complete"
    assert resumed.manifest["steps"] == reference.manifest["steps"]
    assert resumed.order == reference.order and resumed.batches == reference.batches
    assert _shard_digests(resumed) == _shard_digests(reference)
    assert resumed.manifest["initial_state"]["sha256"] == reference.manifest["initial_state"]["sha256"]
    assert _rng_states(resumed) == _rng_states(reference)  # retraining restores the same states at the same steps


def test_a_run_killed_between_its_epoch_end_checkpoint_and_the_next_epoch_retrains_to_what_it_recorded(tmp_path):
    """Killed after the checkpoint of an epoch's last step, before the next epoch's first batch: the interrupted run
    stored no generator states for that step, so the resumed one starts it from the states the last step left. The
    recording must hold them (retraining's loader draws at the new epoch): it once retrained 0.007 away from its own
    recorded loss, while verify() passed."""
    model = ["--dropout", "0.3", "--max-steps", "12"]
    assert _run(tmp_path, "run", "--kill-at", "6:epoch_start", *model) == -9
    assert 6 not in Recording.open(tmp_path / "run" / "rec").rng_states()
    done = subprocess.run([sys.executable, str(SCRIPT), "--dirpath", str(tmp_path / "run" / "rec"), "--ckpt-dir",
                           str(tmp_path / "run" / "ckpt"), "--resume", "--then-retrain", *model], capture_output=True,
                          text=True, timeout=180, env={"OMP_NUM_THREADS": "1", "PATH": "", "TINY_WORKERS": "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = Recording.open(tmp_path / "run" / "rec")
    resumed.verify()
    assert resumed.status == "complete" and 6 in resumed.rng_states()
    retrained = float(done.stdout.split("retrained ")[1].split()[0])
    assert retrained == pytest.approx(resumed.probe_scalars["val_loss"][-1], abs=1e-6)


def test_a_damaged_rng_state_file_is_refused_on_resume_not_rewritten_under_a_new_checksum(tmp_path):
    """Resuming rewrites the generator-state file whole; reading a damaged one first once laundered the damage."""
    model = ["--dropout", "0.3"]
    assert _run(tmp_path, "run", "--kill-at", "5:batch_end", *model) == -9
    recording = Recording.open(tmp_path / "run" / "rec")
    path = recording.root / recording.manifest["rng_state"]["file"]
    data = bytearray(path.read_bytes())
    data[-100:-50] = bytes(50)  # inside step 0's state, the size unchanged
    path.write_bytes(bytes(data))
    with pytest.raises(RecordingError, match="rng_state.*corrupted"):
        Recording.open(tmp_path / "run" / "rec").rng_states()
    done = subprocess.run([sys.executable, str(SCRIPT), "--dirpath", str(tmp_path / "run" / "rec"), "--ckpt-dir",
                           str(tmp_path / "run" / "ckpt"), "--resume", *model], capture_output=True, text=True,
                          timeout=120, env={"OMP_NUM_THREADS": "1", "PATH": "", "TINY_WORKERS": "0"})
    assert done.returncode != 0 and "corrupted" in done.stderr
    with pytest.raises(RecordingError, match="corrupted"):
        Recording.open(tmp_path / "run" / "rec").verify()  # still detected: nothing was rewritten over it
