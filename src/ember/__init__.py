"""Ember: serverless inference for large language models."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ember.env import default_omp_wait_policy

# Before anything imports torch: OpenMP reads how its threads wait once, when it loads.
default_omp_wait_policy()

__version__ = "0.1.0"

if TYPE_CHECKING:
    from ember.engine.llm import LLM
    from ember.engine.request import RequestOutput, SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams", "__version__"]

# loaded on first use, so `import ember` (the CLI, the store) does not import torch
_LAZY = {
    "LLM": "ember.engine.llm",
    "SamplingParams": "ember.engine.request",
    "RequestOutput": "ember.engine.request",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ember' has no attribute {name!r}")
