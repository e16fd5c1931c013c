"""Example LightningModules: a timm ViT classifier and a small LLaMA-style causal language model."""

from lpl.models.lm import CausalLM
from lpl.models.vit import ViTClassifier

__all__ = ["CausalLM", "ViTClassifier"]
