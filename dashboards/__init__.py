"""Run comparison: an HTML report built from MLflow runs."""
