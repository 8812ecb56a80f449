"""Data: sources (local folder or hub), privileged-context strategies, prompts, verl-schema input, prepared parquet."""
