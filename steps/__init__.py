"""One module per flow step: plain functions that call pcsd_core and log to MLflow (never Metaflow)."""
