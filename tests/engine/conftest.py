"""Engine tests share the root conftest's tiny models and tokenizer."""
