"""Structured pruning (SAAP on top of LLM-Pruner, METHODS.md section 5).

Coupled groups (:mod:`.groups`), importance estimators and their fusion
(:mod:`.importance`), per-module ratios (:mod:`.allocation`), physical shrinking and
checkpoints (:mod:`.shrink`), LoRA recovery (:mod:`.recovery`) and the entry point
:func:`orchestrator.structured.run.run_structured`.
"""
