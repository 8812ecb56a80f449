"""Losses: the option vocabulary (`spec`), divergences (`divergence`), the memory-bounded chunked loss, the public API
(`distillation`)."""
