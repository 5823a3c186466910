"""rayprune's driver side: config, planning, pure pruning math, coordinator and CLI."""

__version__ = "0.1.0"
