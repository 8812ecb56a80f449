"""pcsd_core: the PCSD algorithm and its engine. Imports neither Metaflow nor MLflow."""
