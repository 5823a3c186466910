"""Shared fixtures: a seeded tiny LLaMA config and small local corpora."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `auto` compute dtypes resolve to fp32 in every test process and every actor it starts (Ray workers inherit
# the environment), so results and their fp32 references are the same on machines with and without native
# bf16; the bf16 paths are tested with explicit dtypes and by overriding this
os.environ.setdefault("RAYPRUNE_NATIVE_BF16", "0")
# no test reuses another's dense evaluation from the cache (tests/unit/test_api.py turns it on for its test)
os.environ.setdefault("RAYPRUNE_DENSE_CACHE", "0")

TINY = {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "intermediate": 128, "max_positions": 256, "seed": 0}

WORDS = (
    "the quick brown fox jumps over the lazy dog while a small model learns to predict "
    "tokens from python documentation and debian handbooks with loops functions classes "
    "packages kernels modules errors values lists dictionaries strings and numbers"
).split()


def make_corpus(n_docs: int = 12, words_per_doc: int = 120, seed: int = 0) -> list[str]:
    """Deterministic pseudo-English documents."""
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words_per_doc)) for _ in range(n_docs)]


@pytest.fixture(scope="session")
def corpus_parquet(tmp_path_factory) -> Path:
    """A parquet file with columns ``source`` and ``text``."""
    path = tmp_path_factory.mktemp("data") / "corpus.parquet"
    docs = make_corpus()
    pq.write_table(pa.table({"source": [f"doc{i}" for i in range(len(docs))], "text": docs}), path)
    return path


@pytest.fixture(scope="session")
def eval_parquet(tmp_path_factory) -> Path:
    """A second corpus for evaluation."""
    path = tmp_path_factory.mktemp("data") / "eval.parquet"
    docs = make_corpus(seed=1)
    pq.write_table(pa.table({"source": [f"e{i}" for i in range(len(docs))], "text": docs}), path)
    return path


def tiny_overrides(out_dir: Path, calib: Path, **extra: object) -> list[str]:
    """CLI overrides for a seconds-long local run on the tiny model."""
    items = {
        "model.source": "tiny",
        **{f"model.tiny.{k}": v for k, v in TINY.items()},
        "calibration.source": str(calib),
        "calibration.num_samples": 4,
        "calibration.seq_len": 32,
        "eval.enabled": False,
        "backend.kind": "local",
        "output.dir": str(out_dir),
    }
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


@pytest.fixture(scope="module")
def ray_cluster():
    """A local 2-CPU Ray for one test module (an already running Ray is used and left running)."""
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()
