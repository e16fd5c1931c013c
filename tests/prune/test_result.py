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
