"""The CLI tests use the root conftest's tiny random Llama and tokenizer fixtures."""
