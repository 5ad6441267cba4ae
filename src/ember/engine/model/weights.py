"""Weights: looks tensors up by Hugging Face name and wraps them as parameters without copying."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ember.errors import MissingWeightError


class Weights:
    """The checkpoint's tensors, by Hugging Face name. `prefixes` are tried in order
    (e.g. "model." for a *ForCausalLM checkpoint, "" for a bare *Model one)."""

    def __init__(
        self, tensors: Mapping[str, Tensor], device: torch.device, prefixes: tuple[str, ...]
    ) -> None:
        self.tensors = tensors
        self.device = torch.device(device)
        self.prefixes = prefixes

    def find(self, name: str) -> Tensor | None:
        for prefix in self.prefixes:
            t = self.tensors.get(prefix + name)
            if t is not None:
                return t
        return None

    def param(self, name: str) -> nn.Parameter:
        """The tensor as a parameter sharing its memory; raises MissingWeightError."""
        t = self.find(name)
        if t is None:
            raise MissingWeightError(f"the checkpoint has no tensor {self.prefixes[0] + name!r}")
        return as_param(t, self.device)

    def optional(self, name: str) -> nn.Parameter | None:
        t = self.find(name)
        return None if t is None else as_param(t, self.device)


def as_param(t: Tensor, device: torch.device) -> nn.Parameter:
    """A frozen parameter over `t`'s memory: no copy unless it has to move device."""
    if t.device != device:
        t = t.to(device)
    return nn.Parameter(t, requires_grad=False)
