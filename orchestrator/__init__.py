"""rayprune's driver side: config, planning, pure pruning math, coordinator and CLI.

The Python API (:mod:`orchestrator.api`)::

    from orchestrator import prune
    result = prune("configs/default.yaml", pruning={"sparsity": 0.6})
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["PruneResult", "build_config", "prune"]


def __getattr__(name: str) -> Any:
    """The API's names, imported on first use (``import orchestrator`` stays light for the actors)."""
    if name in __all__:
        from orchestrator import api

        return getattr(api, name)
    raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
