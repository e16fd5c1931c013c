"""retrain() and check_methods() trust only what the recording vouches for: checked files, recorded steps."""

from __future__ import annotations

import json
import shutil
import struct

import pytest

from lpl.order import Recording, retrain
from lpl.order.checking import check_methods
from lpl.order.commands import check_methods_main
from lpl.order.store import RecordingError, RecordingWriter
from lpl.utils.errors import LplError
from test_estimator_task import NUM_BATCHES, record


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    return record(tmp_path_factory.mktemp("retrain") / "rec", proj_dim=32, curvature_rank=0)


def _flip_tensor_byte(path, key: str) -> None:
    """Flip the low bit of the first data byte of tensor ``key``: same size, still a readable safetensors file."""
    data = bytearray(path.read_bytes())
    header_size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + header_size])
    data[8 + header_size + header[key]["data_offsets"][0]] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("entry, key", [("initial_state", "net.4.bias"), ("pool", "batch_ids")])
def test_retrain_refuses_a_file_changed_on_disk(recording, tmp_path, entry, key):
    damaged = shutil.copytree(recording, tmp_path / "rec")
    rec = Recording.open(damaged)
    _flip_tensor_byte(damaged / rec.manifest[entry]["file"], key)
    with pytest.raises(RecordingError, match=f"{rec.manifest[entry]['file']} is corrupted"):
        retrain(damaged, rec.order, max_steps=1, accelerator="cpu")


def test_retrain_of_an_opened_recording_hashes_its_files_once(recording, monkeypatch):
    rec = Recording.open(recording)
    first = retrain(rec, rec.order, max_steps=2, accelerator="cpu")
    hashed = []
    monkeypatch.setattr("lpl.order.store.open", lambda path, *a, **k: hashed.append(path) or open(path, *a, **k),
                        raising=False)
    again = retrain(rec, rec.order, max_steps=2, accelerator="cpu")
    assert hashed == [] and again.final_loss == first.final_loss


@pytest.fixture(scope="module")
def stopped(recording, tmp_path_factory):
    """The recording as a run stopped after 4 of its steps leaves it (status "recording", no final probe)."""
    path = shutil.copytree(recording, tmp_path_factory.mktemp("stopped") / "rec")
    rec = Recording.open(path)
    RecordingWriter.resume(path, rec.manifest, rec.batches, rec.order, 4).release()
    return path


def test_retrain_refuses_steps_a_stopped_run_never_recorded(recording, stopped):
    rec = Recording.open(stopped)
    assert rec.status == "recording" and rec.recorded_steps == 4
    with pytest.raises(LplError, match=r"incomplete .*stopped after 4 of 10 steps.*steps 4\.\.9.*resume=True.*"
                                       r"max_steps=4 or less"):
        retrain(stopped, rec.order, accelerator="cpu")
    # the recorded steps retrain exactly: the full run's validation loss after step 4
    truth = Recording.open(recording).probe_scalars["val_loss"][4]
    assert retrain(stopped, rec.order, max_steps=4, accelerator="cpu").final_loss == pytest.approx(truth, abs=1e-6)


def test_check_methods_refuses_a_stopped_run_before_retraining(stopped, tmp_path, monkeypatch):
    monkeypatch.setattr("lpl.order.retraining.retrain", lambda *a, **k: pytest.fail("retrained"))
    orders = [list(range(NUM_BATCHES))] * 3
    with pytest.raises(LplError, match="no final probe at step 10.*incomplete.*resume=True"):
        check_methods(stopped, orders)
    with pytest.raises(LplError, match="no final probe"):
        check_methods_main(["--recording", str(stopped), "--orders", "random:3", "--out", str(tmp_path)])
