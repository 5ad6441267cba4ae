"""Model code for the instance engine: plain PyTorch over the store's zero-copy weights."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ember.engine.model.causal_lm import CausalLM
from ember.engine.model.llama import LlamaForCausalLM
from ember.engine.model.opt import OPTForCausalLM
from ember.engine.model.spec import ModelSpec, RopeSpec
from ember.engine.model.weights import Weights

__all__ = ["CausalLM", "ModelSpec", "RopeSpec", "build_model"]


def build_model(
    spec: ModelSpec, weights: Mapping[str, Tensor], device: torch.device | str = "cpu"
) -> CausalLM:
    """The model for `spec` over `weights` (Hugging Face names). On the weights' own
    device every parameter is the tensor passed in, never a copy; on another device
    each is moved once. Raises MissingWeightError if a tensor is absent."""
    dev = torch.device(device)
    if spec.arch == "opt":
        return OPTForCausalLM(spec, Weights(weights, dev, ("model.decoder.", "decoder.")))
    return LlamaForCausalLM(spec, Weights(weights, dev, ("model.", "")))
