"""Evaluation: GSM8K answer scoring, held-out metrics, per-step collapse diagnostics, statistics (intervals and
paired tests)."""
