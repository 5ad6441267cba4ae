"""The instance engine: model code, paged KV cache, scheduling and the step loop."""
