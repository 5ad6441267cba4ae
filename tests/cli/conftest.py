"""The engine tests' tiny random Llama, for commands that run a model."""

from tests.engine.conftest import tiny_llama, tokenizer_dir

__all__ = ["tiny_llama", "tokenizer_dir"]
