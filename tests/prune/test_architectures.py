"""Pruning and export on timm families beyond the demo ViT: the layers found, the budget met, the export exact."""

import contextlib

import pytest
import timm
import torch
import torch.nn.functional as F

from lpl.prune import apply_masks, prune_model, to_block_sparse

FAMILIES = {  # small configurations of each family (random weights: this checks mechanics, not accuracy)
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=32, patch_size=8), 32),
    "swin": ("swin_tiny_patch4_window7_224",
             dict(img_size=56, embed_dim=32, depths=(1, 1), num_heads=(2, 4), window_size=7), 56),
    "vit_registers": ("vit_small_patch14_reg4_dinov2",
                      dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2), 32),
    "eva02_fused_qkv": ("eva02_tiny_patch14_224", dict(img_size=28, patch_size=7, depth=2), 28),
    # its gated attention reads qk.weight.device when it builds its relative indices (first call or a new size)
    "convit": ("convit_tiny", dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                                   local_up_to_layer=1), 32),
}
EXCLUDE = {"convit": ["*head*", "*pos_proj*"]}  # pos_proj maps 3 relative-position features to the heads


def _loss(model, batch):
    return F.cross_entropy(model(batch["image"]), batch["label"])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prune_and_export_match_the_masked_dense_model(family):
    name, kwargs, size = FAMILIES[family]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    generator = torch.Generator().manual_seed(0)
    batches = [{"image": torch.randn(4, 3, size, size, generator=generator),
                "label": torch.randint(0, 10, (4,), generator=generator)} for _ in range(2)]
    # EVA reads its fused qkv weight through F.linear: that layer is never called, so it stays dense (with a warning)
    expect = (pytest.warns(UserWarning, match="never calls them as modules") if family == "eva02_fused_qkv"
              else contextlib.nullcontext())
    with expect:
        result = prune_model(model, batches, block_size=(16, 16), flops_keep=0.5, loss=_loss,
                             exclude=EXCLUDE.get(family, ["*head*"]))
    assert result.block_masks and all("head" not in layer for layer in result.block_masks)
    assert result.flops_keep == pytest.approx(0.5, abs=0.01)
    apply_masks(model, result)
    images = torch.randn(2, 3, size, size, generator=generator)
    fresh = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()  # never called yet
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        reference = model(images)
        exported = to_block_sparse(model, result)(images)
        exported_fresh = to_block_sparse(fresh, result)(images)
    assert float((exported - reference).norm() / reference.norm()) < 1e-5
    assert float((exported_fresh - reference).norm() / reference.norm()) < 1e-5

