"""Tiny models and calibration data shared by the pruning tests."""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn


class TinyViT(nn.Module):
    """A bare timm ViT with the lpl loss protocol (task loss on {"image", "label"} batches)."""

    def __init__(self, embed_dim: int = 32, depth: int = 1, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.model = timm.create_model("vit_tiny_patch16_224", img_size=28, patch_size=7, in_chans=1, num_classes=10,
                                       embed_dim=embed_dim, depth=depth, num_heads=2, pretrained=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def loss(self, batch: dict) -> torch.Tensor:
        return F.cross_entropy(self(batch["image"]), batch["label"])


def make_batches(count: int = 3, size: int = 8, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {"image": torch.randn(size, 1, 28, 28, generator=generator),
         "label": torch.randint(0, 10, (size,), generator=generator),
         "index": torch.arange(size) + i * size}
        for i in range(count)
    ]
