"""Inputs of a run: the config (YAML + overrides, validated), calibration/evaluation data, model sources."""
