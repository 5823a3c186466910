"""Calibration windows split over the workers: contiguous shards in global order, as Arrow IPC bytes.

Sample ``i`` always goes to the same global position, whatever the number of workers; each worker gets
its shard through Ray's object store, so workers on other nodes need no shared filesystem for it.
"""

from __future__ import annotations

import math

import torch


def shard_bounds(n: int, workers: int) -> list[tuple[int, int]]:
    """Contiguous split: worker r gets global positions ``[r * ceil(n/W), min(n, (r+1) * ceil(n/W)))``."""
    per = math.ceil(n / workers) if n else 0
    return [(min(n, r * per), min(n, (r + 1) * per)) for r in range(workers)]


def shard_tables(input_ids: torch.Tensor, workers: int) -> list:
    """One Arrow table per worker (columns ``position``, ``input_ids``), in global order."""
    import pyarrow as pa

    tables = []
    for lo, hi in shard_bounds(int(input_ids.shape[0]), workers):
        tables.append(pa.table({
            "position": pa.array(list(range(lo, hi)), type=pa.int64()),
            "input_ids": pa.array(input_ids[lo:hi].tolist(), type=pa.list_(pa.int64())),
        }))
    return tables


def shard_bytes(input_ids: torch.Tensor, workers: int) -> list[bytes]:
    """Each worker's shard as the bytes of an Arrow IPC file (shipped through Ray's object store,
    so workers on other nodes need no shared filesystem)."""
    import pyarrow as pa

    out = []
    for table in shard_tables(input_ids, workers):
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        out.append(sink.getvalue().to_pybytes())
    return out
