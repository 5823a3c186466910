"""Outputs of a run: the run directory (model, masks, config, manifest) and the report."""
