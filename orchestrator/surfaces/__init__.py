"""Surfaces users call: the CLI, the Ray Serve apps and the scheduled-run keys."""
