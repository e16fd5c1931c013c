"""CausalLM: a small LLaMA-style decoder (RMSNorm, rotary positions, SwiGLU) as a LightningModule."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from lpl.models.optim import check_adam_options, configure_adam
from lpl.utils.errors import LplError
from lpl.utils.trainer import own_metric_states


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned scale (no mean subtraction, no bias)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary_tables(seq_len: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [seq_len, head_dim / 2] for rotary position embeddings."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., 2i], x[..., 2i+1]) of x [B, H, L, D] by the position angles."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.flatten(-2)


class Attention(nn.Module):
    """Causal multi-head self-attention with rotary position embeddings on queries and keys."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class SwiGLU(nn.Module):
    """Gated feed-forward: fc2(silu(gate) * value), with gate and value from one fc1."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * hidden, bias=False)  # gate and value in one matmul
        self.fc2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.silu(gate) * value)


class DecoderBlock(nn.Module):
    """Pre-norm decoder block: x + attention(norm(x)), then + feed-forward(norm(x))."""

    def __init__(self, dim: int, num_heads: int, hidden: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.mlp_norm = RMSNorm(dim)
        self.mlp = SwiGLU(dim, hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Decoder(nn.Module):
    """Token embedding, pre-norm decoder blocks, final RMSNorm, output head tied to the embedding."""

    def __init__(self, vocab_size: int, dim: int, depth: int, num_heads: int, hidden: int, max_seq_len: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(DecoderBlock(dim, num_heads, hidden) for _ in range(depth))
        self.norm = RMSNorm(dim)
        cos, sin = rotary_tables(max_seq_len, dim // num_heads)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.max_seq_len = max_seq_len
        nn.init.normal_(self.embed.weight, std=0.02)
        for block in self.blocks:  # scaled residual init keeps early training stable
            for linear in (block.attn.proj, block.mlp.fc2):
                nn.init.normal_(linear.weight, std=0.02 / math.sqrt(2 * depth))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[-1]
        if length > self.max_seq_len:
            raise LplError(f"sequence length {length} exceeds max_seq_len {self.max_seq_len}; raise max_seq_len.")
        cos, sin = self.rope_cos[:length], self.rope_sin[:length]
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.norm(x) @ self.embed.weight.T


class CausalLM(L.LightningModule):
    """Next-token prediction with a small LLaMA-style decoder; logs loss and perplexity.

    Batches are ``{"input_ids": [B, L], "labels": [B, L], "index": [B]}`` with labels already shifted.

    Example::

        trainer.fit(CausalLM(vocab_size=256, dim=128, depth=2), datamodule=TextCorpusDataModule(seq_len=64))
    """

    def __init__(
        self,
        vocab_size: int = 256,
        dim: int = 128,
        depth: int = 2,
        num_heads: int = 4,
        mlp_hidden: int | None = None,
        max_seq_len: int = 256,
        optimizer: str = "adamw",
        lr: float = 3e-3,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 10,
        min_lr_ratio: float = 0.1,
        schedule: str = "cosine",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_adam_options(optimizer=optimizer, lr=lr, weight_decay=weight_decay, betas=betas,
                           warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio, schedule=schedule)
        sizes = {"vocab_size": vocab_size, "dim": dim, "depth": depth, "num_heads": num_heads,
                 "max_seq_len": max_seq_len, **({"mlp_hidden": mlp_hidden} if mlp_hidden is not None else {})}
        for name, value in sizes.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LplError(f"{name} must be a whole number >= 1, got {value!r}.")
        if dim % num_heads or (dim // num_heads) % 2:
            raise LplError(f"dim {dim} must split into {num_heads} heads of even size (rotary embeddings need pairs).")
        hidden = mlp_hidden if mlp_hidden is not None else 64 * math.ceil(dim * 8 / 3 / 64)
        self.model = Decoder(vocab_size, dim, depth, num_heads, hidden, max_seq_len)
        # the epoch's loss sum and sample count, for its perplexity (metric states stay out of checkpoints, and sum
        # over processes; a NaN loss makes it NaN, as val/loss is, not dropped: MeanMetric drops NaN, or with
        # nan_strategy="disable" its weights)
        self._loss_sums = nn.ModuleDict({stage: torchmetrics.SumMetric(nan_strategy="disable")
                                         for stage in ("val", "test")})
        self._sample_counts = nn.ModuleDict({stage: torchmetrics.SumMetric(nan_strategy="disable")
                                             for stage in ("val", "test")})

    def setup(self, stage: str) -> None:
        own_metric_states(self)  # in every process (ddp_spawn shares the module's metric states otherwise)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # every batch's ids, while they are still on the host (no device sync): one past the vocabulary is an
        # index error deep in the embedding
        ids = batch.get("input_ids") if isinstance(batch, dict) else None
        vocab = self.model.embed.num_embeddings
        if ids is not None and ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < vocab:
            raise LplError(f"the data hold token ids {int(ids.min())}..{int(ids.max())}, the model's vocabulary has "
                           f"{vocab}: set model.init_args.vocab_size.")
        return batch

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean next-token cross-entropy of a batch (the loss protocol the plug-ins call)."""
        logits = self(batch["input_ids"])
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        loss = self.loss(batch)
        size = batch["input_ids"].shape[0]
        self.log(f"{stage}/loss", loss, sync_dist=True, batch_size=size)
        self._loss_sums[stage].update(loss.detach().float() * size)
        self._sample_counts[stage].update(torch.tensor(float(size), device=loss.device))

    def _log_perplexity(self, stage: str) -> None:
        """exp of the epoch's sample-weighted mean loss (over every process), not a mean of per-batch exps, which
        depends on the batch size."""
        loss_sum, count = self._loss_sums[stage], self._sample_counts[stage]
        if count.update_count:
            self.log(f"{stage}/ppl", (loss_sum.compute() / count.compute()).exp(), prog_bar=True)
        loss_sum.reset()
        count.reset()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_perplexity("val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_perplexity("test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        logits = self(batch["input_ids"])
        nll = F.cross_entropy(logits.transpose(1, 2), batch["labels"], reduction="none").mean(-1)
        return {"index": batch["index"], "loss": nll}

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        return configure_adam(
            self, optimizer=hp.optimizer, lr=hp.lr, weight_decay=hp.weight_decay, betas=hp.betas,
            warmup_steps=hp.warmup_steps, min_lr_ratio=hp.min_lr_ratio, schedule=hp.schedule,
        )
