"""Configuration: the frozen, validated `PCSDConfig` (`schema`) and the one loader of presets and overrides (`loader`)."""
