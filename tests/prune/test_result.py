import torch

from lpl.prune import PruneResult, prune_model


def test_save_load_round_trip_without_pickle(tiny_vit, batches, tmp_path):
    result = prune_model(tiny_vit, batches, block_size=(8, 8), flops_keep=0.5)
    result.save(tmp_path / "result")
    assert sorted(p.name for p in (tmp_path / "result").iterdir()) == ["masks.safetensors", "result.json"]
    loaded = PruneResult.load(tmp_path / "result")
    assert loaded.block_size == (8, 8) and loaded.block_masks.keys() == result.block_masks.keys()
    for name, mask in result.block_masks.items():
        assert loaded.block_masks[name].dtype == torch.bool
        assert torch.equal(loaded.block_masks[name], mask)
        torch.testing.assert_close(loaded.curves[name]["distortion"], result.curves[name]["distortion"])
        assert torch.equal(loaded.curves[name]["order"], result.curves[name]["order"])
    assert loaded.flops_keep == result.flops_keep and loaded.density == result.density
    assert loaded.predicted_speedup == result.predicted_speedup
    assert loaded.options["importance"] == "taylor2"
    loaded.check_model(tiny_vit)


def test_masks_cover_qkv_proj_fc1_fc2_and_skip_the_head_by_default(tiny_vit, batches):
    result = prune_model(tiny_vit, batches, block_size=(8, 8), flops_keep=0.5)
    assert sorted(result.block_masks) == sorted(
        f"model.blocks.0.{n}" for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"))
    assert result.block_masks["model.blocks.0.attn.qkv"].shape == (12, 4)
    with_head = prune_model(tiny_vit, batches, block_size=(8, 8), flops_keep=0.5, exclude=[])
    assert "model.head" in with_head.block_masks  # 10 x 32 head: ragged 8-row blocks
    assert with_head.block_masks["model.head"].shape == (2, 4)


def test_load_refuses_a_pair_of_files_from_two_saves_or_a_damaged_one(tiny_vit, batches, tmp_path):
    """Masks and metadata are two files: the metadata holds the masks file's sha256, so a save interrupted between
    the two writes (new masks beside old metadata) or a truncated file is refused instead of read."""
    import json
    import shutil

    import pytest

    from lpl.utils.errors import LplError

    half = prune_model(tiny_vit, batches, block_size=(8, 8), flops_keep=0.5)
    quarter = prune_model(tiny_vit, batches, block_size=(8, 8), flops_keep=0.25)
    half.save(tmp_path / "half")
    quarter.save(tmp_path / "quarter")
    shutil.copy(tmp_path / "quarter" / "masks.safetensors", tmp_path / "half" / "masks.safetensors")
    with pytest.raises(LplError, match="does not match"):
        PruneResult.load(tmp_path / "half")
    data = (tmp_path / "quarter" / "masks.safetensors").read_bytes()
    (tmp_path / "quarter" / "masks.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LplError, match="does not match"):
        PruneResult.load(tmp_path / "quarter")
    meta = json.loads((tmp_path / "quarter" / "result.json").read_text())
    del meta["masks_sha256"], meta["result_sha256"], meta["shapes"]  # an older save (no checksums), edited by hand
    (tmp_path / "quarter" / "result.json").write_text(json.dumps(meta))
    with pytest.raises(LplError, match="not a readable safetensors file"):
        PruneResult.load(tmp_path / "quarter")
    quarter.save(tmp_path / "quarter")
    text = (tmp_path / "quarter" / "result.json").read_text()
    for damaged in (text.replace('"block_size": [\n    8,', '"block_size": [\n    9,'),  # one bit: 8 -> 9
                    text.replace('"flops_keep": 0.25', '"flops_keep": 0.35')):
        assert damaged != text
        (tmp_path / "quarter" / "result.json").write_text(damaged)
        with pytest.raises(LplError, match="result.json was changed or damaged"):
            PruneResult.load(tmp_path / "quarter")
    meta = json.loads(text)
    del meta["shapes"], meta["result_sha256"]
    (tmp_path / "quarter" / "result.json").write_text(json.dumps(meta))
    with pytest.raises(LplError, match="lacks or mistypes 'shapes'"):
        PruneResult.load(tmp_path / "quarter")
    (tmp_path / "quarter" / "result.json").write_text("{not json")
    with pytest.raises(LplError, match="cannot read the PruneResult"):
        PruneResult.load(tmp_path / "quarter")


def test_numpy_and_tensor_options_are_stored_as_plain_numbers(tiny_vit, batches, tmp_path):
    import numpy as np

    result = prune_model(tiny_vit, batches, block_size=(8, 8), flops_keep=np.float64(0.5),
                         lambda_power=torch.tensor(1.0), min_density=np.float32(0.05), max_density=np.float16(1.0))
    result.save(tmp_path / "result")
    options = PruneResult.load(tmp_path / "result").options
    assert (options["lambda_power"], options["max_density"]) == (1.0, 1.0)
    assert options["min_density"] == float(np.float32(0.05))


def test_save_of_options_json_cannot_hold_writes_nothing(tiny_vit, batches, tmp_path):
    import pytest

    from lpl.utils.errors import LplError

    result = prune_model(tiny_vit, batches, block_size=(8, 8), flops_keep=0.5)
    result.options["scale"] = torch.tensor(2.0)
    with pytest.raises(LplError, match="nothing was written"):
        result.save(tmp_path / "result")
    assert not (tmp_path / "result").exists() or not any((tmp_path / "result").iterdir())


def test_options_with_number_keys_save_and_load(tiny_vit, batches, tmp_path):
    """The metadata's own checksum is taken as JSON reads it back (number keys become strings and sort otherwise):
    such a result saved, then was refused as damaged at every load."""
    import dataclasses

    result = prune_model(tiny_vit, batches, block_size=(8, 8), flops_keep=0.5)
    result = dataclasses.replace(result, options={**result.options, "per_layer": {2: 0.5, 10: 0.25}})
    result.save(tmp_path / "r")
    assert PruneResult.load(tmp_path / "r").options["per_layer"] == {"2": 0.5, "10": 0.25}
