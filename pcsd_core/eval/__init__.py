"""Evaluation: GSM8K answer scoring, held-out metrics, statistics (intervals and paired tests)."""
