import hashlib
import json

import pytest
import torch

from lpl.order.store import MANIFEST, MANIFEST_SHA256, Recording, RecordingError, RecordingWriter, parameter_signature
from lpl.utils.errors import LplError

BATCHES = [[0, 1], [2, 3], [4, 5, 6]]
ORDER = [2, 0, 1, 2]


def _header(**overrides):
    header = {
        "model": parameter_signature([("w", (3, 2)), ("b", (3,))]),
        "projection": {"seed": 0, "proj_dim": 4, "kind": "rademacher"},
        "store_dtype": "float16",
        "num_steps": len(ORDER),
        "probe_every_n_steps": 2,
        "world_size": 1,
        "optimizer": {"name": "Adam"},
    }
    header.update(overrides)
    return header


def _pool_out(position, t):
    return {"loss": torch.tensor(float(position + t) / 3), "grad": torch.arange(4.0) + position + 10 * t}


def _record(root, steps=range(4), probe_every=2, finish=True, world=1):
    writer = RecordingWriter.create(root, _header(world_size=world), BATCHES, ORDER,
                                    {"w": torch.ones(3, 2), "b": torch.zeros(3)})
    for t in steps:
        if t % probe_every == 0:
            shards = []
            for rank in range(world):
                positions = [p for p in range(len(BATCHES)) if p % world == rank]
                val = {"val_loss": torch.tensor(1.5 - t), "val_grad": torch.full((4,), float(t))} if rank == 0 else None
                shards.append(writer.write_probe_shard(t, rank, [_pool_out(p, t) for p in positions], positions, val))
            writer.add_probe(t, shards, {"val_loss": 1.5 - t})
        writer.add_step(t, {"batch": ORDER[t], "lr": 0.1 * (t + 1)})
        writer.flush()
    if finish:
        writer.finish()
    return writer


def test_roundtrip_reads_what_was_written(tmp_path):
    _record(tmp_path)
    rec = Recording.open(tmp_path)
    rec.verify()
    assert rec.status == "complete" and rec.num_steps == 4 and rec.recorded_steps == 4 and rec.proj_dim == 4
    assert rec.order == ORDER and rec.batches == BATCHES
    assert rec.probe_steps == [0, 2]
    assert rec.scalars["lr"] == pytest.approx([0.1, 0.2, 0.3, 0.4]) and rec.scalars["batch"] == ORDER
    assert rec.probe_scalars["val_loss"] == [1.5, -0.5]
    step = rec.step(2)
    assert step["grad"].dtype == torch.float16 and step["grad"].shape == (3, 4)
    assert torch.equal(step["grad"].float(), torch.stack([torch.arange(4.0) + p + 20 for p in range(3)]))
    assert step["loss"].dtype == torch.float32  # scalars keep fp32
    assert torch.equal(step["loss"], torch.tensor([2 / 3, 1.0, 4 / 3]))
    assert torch.equal(step["val_grad"].float(), torch.full((4,), 2.0))
    assert set(rec.step(0, names=["loss"])) == {"loss"}
    assert torch.equal(rec.initial_state()["w"], torch.ones(3, 2))
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["sizes"]["total_bytes"] == sum(f["bytes"] for f in rec.files())


def test_values_beyond_float16_range_are_kept_in_float32_not_written_as_infinity(tmp_path):
    writer = RecordingWriter.create(tmp_path, _header(), BATCHES, ORDER, {"w": torch.ones(3, 2), "b": torch.zeros(3)})
    big = [{"loss": torch.tensor(1.0), "grad": torch.tensor([1e6, -3.0, 0.5, 7e4]) + p} for p in range(3)]
    shard = writer.write_probe_shard(0, 0, big, [0, 1, 2], {"val_loss": torch.tensor(1.0), "val_grad": torch.ones(4)})
    writer.add_probe(0, [shard], {"val_loss": 1.0})
    writer.flush()
    step = Recording.open(tmp_path).step(0)
    assert torch.isfinite(step["grad"]).all() and step["grad"].dtype == torch.float32
    assert torch.equal(step["grad"], torch.stack([torch.tensor([1e6, -3.0, 0.5, 7e4]) + p for p in range(3)]))
    assert step["val_grad"].dtype == torch.float16  # in range: the store dtype


def test_values_below_float16_range_are_kept_in_float32_not_flushed_to_zero(tmp_path):
    # a loss scaled by 1e-6 gives gradients ~1e-8, below float16's smallest normal (6e-5): zeros and subnormals
    writer = RecordingWriter.create(tmp_path, _header(), BATCHES, ORDER, {"w": torch.ones(3, 2), "b": torch.zeros(3)})
    tiny = [{"loss": torch.tensor(1.0), "grad": torch.tensor([3e-8, -1e-8, 2.5e-9, 7e-8]) * (p + 1)} for p in range(3)]
    faint = torch.tensor([1.0, -3.0, 0.5, 7.0]) * 1e-6  # subnormal in float16: ~3 significant bits left
    shard = writer.write_probe_shard(0, 0, tiny, [0, 1, 2], {"val_loss": torch.tensor(1.0), "val_grad": faint})
    writer.add_probe(0, [shard], {"val_loss": 1.0})
    writer.flush()
    step = Recording.open(tmp_path).step(0)
    assert step["grad"].dtype == torch.float32 and step["val_grad"].dtype == torch.float32
    assert torch.equal(step["grad"], torch.stack([out["grad"] for out in tiny]))
    assert torch.equal(step["val_grad"], faint)


def test_shards_of_several_ranks_merge_into_pool_order(tmp_path):
    _record(tmp_path / "one")
    _record(tmp_path / "two", world=2)
    one, two = Recording.open(tmp_path / "one"), Recording.open(tmp_path / "two")
    for t in (0, 2):
        a, b = one.step(t), two.step(t)
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_unflushed_steps_and_orphan_shards_are_invisible(tmp_path):
    writer = _record(tmp_path, steps=range(2), finish=False)
    writer.write_probe_shard(2, 0, [_pool_out(p, 2) for p in range(3)], [0, 1, 2], None)  # killed before the manifest
    writer.add_step(2, {"batch": 2, "lr": 0.3})
    rec = Recording.open(tmp_path)
    rec.verify()
    assert rec.status == "recording" and rec.recorded_steps == 2 and rec.probe_steps == [0]


def test_corrupted_and_truncated_shards_are_named(tmp_path):
    _record(tmp_path)
    shard = tmp_path / "probes" / "t000002_r0.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(RecordingError, match="t000002_r0.safetensors is corrupted"):
        Recording.open(tmp_path).verify()
    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(RecordingError, match="t000002_r0.safetensors has .* truncated"):
        Recording.open(tmp_path).step(2)
    assert issubclass(RecordingError, LplError)
    shard.write_bytes(b"\xff" * len(data))  # same size, garbage header
    with pytest.raises(RecordingError, match="t000002_r0.safetensors is corrupted"):
        Recording.open(tmp_path).step(2)
    # one bit off in a key name: the header still parses (a bare KeyError before)
    data[-3] ^= 0xFF  # the shard as written
    assert b'"pool_positions"' in data
    shard.write_bytes(bytes(data).replace(b'"pool_positions"', b'"pool_positionr"'))
    with pytest.raises(RecordingError, match="t000002_r0.safetensors holds no pool_positions: it is corrupted"):
        Recording.open(tmp_path).step(2)


def test_open_refuses_missing_or_garbled_manifest(tmp_path):
    with pytest.raises(RecordingError, match="manifest.json is missing"):
        Recording.open(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(RecordingError, match="unreadable"):
        Recording.open(tmp_path)


def test_create_refuses_an_existing_recording(tmp_path):
    _record(tmp_path)
    with pytest.raises(RecordingError, match="already holds a recording.*resume=True"):
        _record(tmp_path)


def test_resume_drops_steps_after_the_checkpoint_and_checks_identity(tmp_path):
    _record(tmp_path)
    with pytest.raises(RecordingError, match="projection.proj_dim"):
        RecordingWriter.resume(tmp_path, _header(projection={"seed": 0, "proj_dim": 8, "kind": "rademacher"}),
                               BATCHES, ORDER, 2)
    with pytest.raises(RecordingError, match="model.param_hash"):
        RecordingWriter.resume(tmp_path, _header(model=parameter_signature([("w", (2, 3)), ("b", (3,))])),
                               BATCHES, ORDER, 2)
    with pytest.raises(RecordingError, match="pool.sha256"):
        RecordingWriter.resume(tmp_path, _header(), BATCHES, [0, 1, 2, 2], 2)
    with pytest.raises(RecordingError, match="projection.seed"):
        RecordingWriter.resume(tmp_path, _header(projection={"seed": 1, "proj_dim": 4, "kind": "rademacher"}),
                               BATCHES, ORDER, 2)
    with pytest.raises(RecordingError, match="curvature_rank"):
        RecordingWriter.resume(tmp_path, _header(curvature_rank=3), BATCHES, ORDER, 2)
    other_module = {**_header()["model"], "class_path": "my.OtherNet", "hparams": {"width": 8}}
    with pytest.raises(RecordingError, match="model.class_path"):
        RecordingWriter.resume(tmp_path, _header(model=other_module), BATCHES, ORDER, 2)
    writer = RecordingWriter.resume(tmp_path, _header(), BATCHES, ORDER, 2)
    rec = Recording.open(tmp_path)
    assert rec.status == "recording" and rec.recorded_steps == 2 and rec.probe_steps == [0]
    writer.add_step(2, {"batch": 2, "lr": 0.3})
    with pytest.raises(RecordingError, match="steps must be recorded once each"):
        writer.add_step(2, {"batch": 2, "lr": 0.3})
    writer.release()
    with pytest.raises(RecordingError, match="never recorded"):
        RecordingWriter.resume(tmp_path, _header(), BATCHES, ORDER, 3)


def _edit_manifest(root, edit):
    manifest = json.loads((root / MANIFEST).read_text())
    edit(manifest)
    (root / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["steps"][2].update(lr="0.3"), r"steps\[2\]\.lr is '0.3', not a number"),
    (lambda m: m["steps"][2].update(lr=None), r"steps\[2\]\.lr is None, not a number"),
    (lambda m: m["steps"][1].update(lr=-0.1), r"steps\[1\]\.lr is -0.1, outside \[0, inf\)"),
    (lambda m: m["steps"][1].update(beta1=2.9), r"steps\[1\]\.beta1 is 2.9, outside \[0, 1\)"),
    (lambda m: m.pop("steps"), "steps is missing"),
    (lambda m: m["probes"][1]["shards"][0].pop("sha256"), r"probes\[1\]\.shards\[0\]\.sha256 is missing"),
    (lambda m: m.update(num_steps="six"), "num_steps is 'six', not an integer"),
    (lambda m: m.update(steps=m["steps"][:2]), "steps lists 2 training steps for a complete run of num_steps = 4"),
    (lambda m: m.update(steps=m["steps"] + m["steps"][:1]), "steps lists 5 training steps"),
    (lambda m: m["optimizer"].update(betas=[0.9]), r"optimizer\.betas is \[0\.9\], not two numbers"),
    (lambda m: m["optimizer"].update(lr="1e-3"), r"optimizer\.lr is '1e-3', not a number"),
    (lambda m: m.pop("status"), "status is missing"),
    (lambda m: m.update(status="done"), "status is 'done', not 'recording' or 'complete'"),
    (lambda m: m["steps"][3].pop("batch"), r"steps\[3\]\.batch is missing"),
    (lambda m: m["steps"][1].update(t=2), r"steps\[1\]\.t is 2: training steps must be listed once each"),
    (lambda m: m["probes"].insert(1, m["probes"][0]), r"probes\[1\]\.t is 0: probed steps must be listed once each"),
    (lambda m: m["probes"][1].update(val_loss="low"), r"probes\[1\]\.val_loss is 'low', not a number"),
    (lambda m: m["probes"][1].update(shards=[]), r"probes\[1\]\.shards is empty"),
    (lambda m: m["pool"].pop("num_batches"), "pool.num_batches is missing"),
    (lambda m: m.update(initial_state="initial_state.safetensors"), "initial_state is 'initial_state.s.*, not"),
    (lambda m: m["projection"].update(proj_dim=4.0), r"projection\.proj_dim is 4\.0, not an integer"),
], ids=["lr_str", "lr_null", "lr_negative", "beta1_past_one", "no_steps", "shard_no_sha256", "num_steps_str",
        "steps_cut", "steps_extra", "betas_short", "optimizer_lr_str", "no_status", "status_unknown",
        "step_field_missing", "steps_out_of_order", "probes_repeated", "probe_scalar_str", "no_shards",
        "no_num_batches", "file_entry_str", "proj_dim_float"])
def test_open_refuses_an_edited_manifest_naming_its_bad_field(tmp_path, edit, message):
    _record(tmp_path)
    _edit_manifest(tmp_path, edit)
    with pytest.raises(RecordingError, match=f"manifest.json is damaged or was edited: {message}.*record the run"):
        Recording.open(tmp_path)


def _checksum_holds(root) -> bool:
    """The manifest on disk carries the sha256 of the rest of its content as canonical JSON."""
    content = json.loads((root / MANIFEST).read_text())
    stored = content.pop(MANIFEST_SHA256)
    return stored == hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def test_manifests_as_the_recorder_writes_them_pass_the_checks(tmp_path):
    """Full optimizer and step fields, RNG state, sensitivity data, and runs stopped early or resumed; every manifest
    write carries the manifest's own checksum."""
    optimizer = {"name": "AdamW", "lr": 0.1, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01,
                 "weight_decays": [0.01, 0.0], "decoupled": True}
    writer = RecordingWriter.create(tmp_path, _header(optimizer=optimizer), BATCHES, ORDER,
                                    {"w": torch.ones(3, 2), "b": torch.zeros(3)})
    Recording.open(tmp_path).verify()  # created, no step yet
    assert _checksum_holds(tmp_path)
    writer.write_rng_state({"torch": torch.zeros(4, dtype=torch.uint8)})
    assert _checksum_holds(tmp_path)
    for t in range(2):
        writer.add_step(t, {"batch": ORDER[t], "lr": 0.1, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8,
                            "weight_decay": 0.01})
    writer.flush()
    writer.release()
    Recording.open(tmp_path).verify()  # stopped early
    writer = RecordingWriter.resume(tmp_path, _header(optimizer=optimizer), BATCHES, ORDER, 1)
    assert _checksum_holds(tmp_path)
    for t in range(1, 4):
        writer.add_step(t, {"batch": ORDER[t], "lr": 0.1, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8,
                            "weight_decay": 0.01})
    shard = writer.write_probe_shard(4, 0, [_pool_out(p, 4) for p in range(3)], [0, 1, 2],
                                     {"val_loss": torch.tensor(1.0), "val_grad": torch.ones(4)})
    writer.add_probe(4, [shard], {"val_loss": 1.0})
    writer.finish()
    Recording.open(tmp_path).write_sensitivity({"tables": torch.zeros(1, 4, 3)}, {
        "curvature_rank": 0, "hessian_rank": 0, "reference_replay_drift": 0.001, "seconds": 1.5,
        "checks": [{"order": [1, 0, 2, 2], "estimates": {"adjoint": 1.2}, "retrained": 1.1}]})
    assert _checksum_holds(tmp_path)
    rec = Recording.open(tmp_path)
    rec.verify()
    assert rec.status == "complete" and rec.recorded_steps == 4 and rec.probe_steps == [4]
    assert rec.sensitivity() is not None and rec.rng_states() and MANIFEST_SHA256 not in rec.manifest


def test_a_value_changed_in_the_manifest_is_refused_by_its_own_checksum(tmp_path):
    _record(tmp_path)
    text = (tmp_path / MANIFEST).read_text()
    assert text.count('"lr": 0.2,') == 1
    (tmp_path / MANIFEST).write_text(text.replace('"lr": 0.2,', '"lr": 0.7,'))  # one byte, still valid JSON
    with pytest.raises(RecordingError, match=f"manifest.json is damaged or was edited: its content does not match "
                                             f"its {MANIFEST_SHA256}"):
        Recording.open(tmp_path)
    (tmp_path / MANIFEST).write_text(" \n".join(text.splitlines()))  # layout is not content
    Recording.open(tmp_path).verify()


def test_a_manifest_written_before_it_had_a_checksum_still_opens(tmp_path):
    _record(tmp_path)
    _edit_manifest(tmp_path, lambda m: m.pop(MANIFEST_SHA256))
    with pytest.warns(UserWarning, match=f"has no {MANIFEST_SHA256} .*edits to it cannot be detected"):
        rec = Recording.open(tmp_path)
    rec.verify()
    assert rec.status == "complete" and rec.order == ORDER


def test_a_manifest_json_that_is_a_folder_is_named_as_such(tmp_path):
    (tmp_path / MANIFEST).mkdir()
    with pytest.raises(RecordingError, match="manifest.json is not a file"):
        Recording.open(tmp_path)
    with pytest.raises(RecordingError, match="manifest.json is not a file"):
        RecordingWriter.create(tmp_path, _header(), BATCHES, ORDER, {"w": torch.ones(3, 2), "b": torch.zeros(3)})


def test_verify_hashes_each_file_once_per_recording_object(tmp_path, monkeypatch):
    _record(tmp_path)
    rec = Recording.open(tmp_path)
    hashed = []
    monkeypatch.setattr("lpl.order.store.open", lambda path, *a, **k: hashed.append(path.name) or open(path, *a, **k),
                        raising=False)
    rec.verify(["pool", "initial_state"])  # what a reader is about to use
    assert sorted(hashed) == ["initial_state.safetensors", "pool.safetensors"]
    rec.verify()
    rec.verify()
    assert sorted(hashed) == sorted(info["file"].rpartition("/")[2] for info in rec.files())
    with pytest.raises(LplError, match="verify.. takes entries among"):
        rec.verify(["probes"])


def test_rng_states_of_steps_are_kept_until_a_resume_replaces_those_steps(tmp_path):
    writer = _record(tmp_path, finish=False)
    states = {t: {"torch": torch.full((4,), t, dtype=torch.uint8)} for t in (0, 2, 3)}
    for t, state in states.items():
        writer.write_rng_state(state, t)
    stored = Recording.open(tmp_path).rng_states()
    assert list(stored) == [0, 2, 3] and all(torch.equal(stored[t]["torch"], states[t]["torch"]) for t in stored)
    writer.release()
    RecordingWriter.resume(tmp_path, _header(), BATCHES, ORDER, 2)  # steps 2.. run again: their states go
    assert list(Recording.open(tmp_path).rng_states()) == [0]


def test_rewriting_a_file_the_manifest_names_survives_a_kill_at_any_point(tmp_path, monkeypatch):
    """The RNG file is rewritten as steps add states: the new content goes under a new name, so a kill before the
    manifest names it leaves the old manifest and its file intact (rewriting in place would leave a sha256 mismatch)."""
    writer = _record(tmp_path, finish=False)
    writer.write_rng_state({"torch": torch.zeros(4, dtype=torch.uint8)}, 0)

    def killed() -> None:
        raise KeyboardInterrupt("the process dies before the manifest is written")

    monkeypatch.setattr(writer, "flush", killed)
    with pytest.raises(KeyboardInterrupt):
        writer.write_rng_state({"torch": torch.ones(4, dtype=torch.uint8)}, 2)
    recording = Recording.open(tmp_path)
    recording.verify()
    assert list(recording.rng_states()) == [0]
    monkeypatch.undo()
    writer.write_rng_state({"torch": torch.ones(4, dtype=torch.uint8)}, 2)
    recording = Recording.open(tmp_path)
    recording.verify()
    assert list(recording.rng_states()) == [0, 2]
    named = recording.manifest["rng_state"]["file"]
    assert [p.name for p in tmp_path.glob("rng_state*")] in ([named], sorted([named, "rng_state.safetensors"]))


def test_a_file_a_running_writer_replaced_after_opening_says_to_open_again(tmp_path):
    writer = _record(tmp_path, finish=False)
    writer.write_rng_state({"torch": torch.zeros(4, dtype=torch.uint8)}, 0)
    writer.write_rng_state({"torch": torch.ones(4, dtype=torch.uint8)}, 2)
    opened = Recording.open(tmp_path)
    writer.write_rng_state({"torch": torch.ones(4, dtype=torch.uint8)}, 3)  # a new file; the one named above goes
    with pytest.raises(RecordingError, match="being written when it was opened.*open it again"):
        opened.rng_states()
    assert list(Recording.open(tmp_path).rng_states()) == [0, 2, 3]
    (tmp_path / Recording.open(tmp_path).manifest["rng_state"]["file"]).unlink()  # lost, not replaced
    with pytest.raises(RecordingError, match="is missing; the recording is incomplete"):
        Recording.open(tmp_path).rng_states()


def test_one_writer_at_a_time(tmp_path):
    writer = _record(tmp_path, finish=False)
    with pytest.raises(RecordingError, match="being written by another writer"):
        RecordingWriter.resume(tmp_path, _header(), BATCHES, ORDER, 2)
    writer.release()
    RecordingWriter.resume(tmp_path, _header(), BATCHES, ORDER, 2).release()

