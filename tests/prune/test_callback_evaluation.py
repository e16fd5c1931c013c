"""BlockPruneCallback's figures are sample-weighted means over the validation data, whatever the batches carry."""

from __future__ import annotations

import lightning as L
import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from lpl.prune import BlockPruneCallback


class _Labelled(Dataset):
    """17 samples as dicts without sample ids: the last batch of 16 holds one sample."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(17, 3, 16, 16, generator=g), torch.randint(0, 4, (17,), generator=g)

    def __len__(self) -> int:
        return 17

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "label": self.y[i]}


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4,
                                     embed_dim=32, depth=1, num_heads=2, num_classes=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch["image"]), batch["label"])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_figures_weight_batches_by_their_samples_without_sample_ids(tmp_path):
    callback = BlockPruneCallback(block_size=16, flops_keep=0.5, calib_batches=1, distill=False)
    module = _Tiny()
    loader = DataLoader(_Labelled(), batch_size=16)
    L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              default_root_dir=tmp_path, callbacks=[callback], num_sanity_val_steps=0).fit(module, loader, loader)
    module.eval()
    with torch.no_grad():
        logits = torch.cat([module(batch["image"]) for batch in loader])
    labels = torch.cat([batch["label"] for batch in loader])
    assert callback.metrics["prune/finetuned_val_acc"] == pytest.approx(
        float((logits.argmax(-1) == labels).float().mean()))
    assert callback.metrics["prune/finetuned_val_loss"] == pytest.approx(
        float(F.cross_entropy(logits, labels)), rel=1e-5)


class _TokenLabelled(Dataset):
    """Per-token class labels [T] (a tagging task), some ignored (-100, cross-entropy's ignore_index)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(20, 6, 32, generator=g), torch.randint(0, 4, (20, 6), generator=g)
        self.y[::3, 0] = -100

    def __len__(self) -> int:
        return 20

    def __getitem__(self, i: int) -> dict:
        return {"input": self.x[i], "label": self.y[i]}


class _Tagger(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32),
                                       torch.nn.GELU(), torch.nn.Linear(32, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def loss(self, batch: dict) -> torch.Tensor:
        return F.cross_entropy(self(batch["input"]).flatten(0, 1), batch["label"].flatten())

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.loss(batch)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_accuracy_of_per_token_labels_counts_tokens_not_samples(tmp_path):
    """It divided the correct tokens by the samples (T times too high, above 1 here before)."""
    callback = BlockPruneCallback(block_size=16, flops_keep=0.5, calib_batches=1, distill=False, stages=1,
                                  exclude=["net.4"])
    module = _Tagger()
    loader = DataLoader(_TokenLabelled(), batch_size=8)
    L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              default_root_dir=tmp_path, callbacks=[callback], num_sanity_val_steps=0).fit(module, loader, loader)
    module.eval()
    with torch.no_grad():
        predictions = torch.cat([module(batch["input"]).argmax(-1) for batch in loader])
    labels = torch.cat([batch["label"] for batch in loader])
    counted = labels >= 0
    assert callback.metrics["prune/finetuned_val_acc"] == pytest.approx(
        float((predictions == labels)[counted].float().mean()))
