"""The inference engine: sequences, paged KV blocks, scheduler, model runner, sampler, LLMEngine."""
