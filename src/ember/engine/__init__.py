"""The instance engine: model, paged KV cache, scheduler, sampler and the iteration loop."""
