"""The README's structured table is the structured benchmark's committed JSON, rendered."""

from __future__ import annotations

from tests.unit.readme_tables import assert_readme_block_current, table_module


def _table_module():
    return table_module("structured_table")


def test_readme_structured_table_is_rendered_from_the_committed_json():
    assert_readme_block_current(_table_module(), "structured")


def test_rows_are_compared_with_the_peer_of_the_same_target_and_recovery():
    mod = _table_module()

    def row(alloc, target, ppl, loss=None, **kw):
        return {"allocation": alloc, "target": target, "ppl": ppl, "recovered": loss is not None,
                **({"loss": loss} if loss else {}), "params": 85e6, **kw}

    result = {"dense": {"params": 106e6, "ppl": 20.0, "debian_cloze_acc": 0.8}, "rows": [
        row("torch-pruning", 0.2, 30.0, prefill_speedup=1.2), row("torch-pruning", 0.2, 25.0, "ce"),
        row("mlp+uniform+obs", 0.2, 27.0, debian_cloze_acc=0.75, prefill_speedup=1.21),
        row("mlp+uniform+obs", 0.2, 24.0, "ce"), row("mlp+uniform+obs", 0.2, 22.5, "kd"),
        row("depth", 0.5, 900.0)]}
    table = mod.render(result)
    assert "| 20% | **mlp+uniform+obs** | none | 85.00M | 27.00 | -10.0% | 0.750 | 1.21 |  |" in table
    assert "| 20% | **mlp+uniform+obs** | LoRA, cross-entropy | 85.00M | 24.00 | -4.0% |" in table
    assert "| 20% | **mlp+uniform+obs** | LoRA, distillation | 85.00M | 22.50 | -10.0% |" in table  # vs peer's CE
    assert "| 20% | Torch-Pruning (peer) | none | 85.00M | 30.00 |  |" in table
    assert "| 50% | **depth** | none | 85.00M | 900.00 |  |" in table  # no peer at 50% in this run
    lines = table.splitlines()
    assert lines.index(next(x for x in lines if "27.00" in x)) < lines.index(next(x for x in lines if "24.00" in x))
