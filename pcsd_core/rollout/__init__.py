"""Rollout engines behind one interface (`base.RolloutEngine`): `hf` (transformers) and `sglang` (GPU)."""
