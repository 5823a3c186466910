"""The README's quality table is the quality benchmark's committed JSON, rendered."""

from __future__ import annotations

from tests.unit.readme_tables import assert_readme_block_current, table_module


def _table_module():
    return table_module("quality_table")


def test_readme_quality_table_is_rendered_from_the_committed_json():
    assert_readme_block_current(_table_module(), "quality")


def test_render_compares_with_the_peer_of_the_same_pattern_and_sparsity():
    mod = _table_module()
    rows = [
        {"method": "llmc-sparsegpt", "pattern": "2:4", "options": {}, "ppl": 60.0, "debian_cloze_acc": 0.6,
         "prune_s": 90},
        {"method": "sparsegpt", "pattern": "2:4", "options": {"reconstruct": "layer"}, "ppl": 54.0,
         "debian_cloze_acc": 0.62, "prune_s": 100},
        {"method": "sparsegpt", "pattern": "unstructured", "options": {"sparsity": "0.7"}, "ppl": 80.0,
         "debian_cloze_acc": 0.5, "prune_s": 100},
        {"method": "sparsegpt", "pattern": "2:4", "options": {}, "ppl": 62.0, "debian_cloze_acc": 0.6, "prune_s": 80},
        {"method": "llmc-wanda", "pattern": "unstructured", "options": {}, "skipped": "absent"},
    ]
    table = mod.render({"dense_ppl": 20.0, "dense_debian_cloze_acc": 0.8, "rows": rows})
    assert "| **sparsegpt** | 2:4 | 0.5 | reconstruct=layer | 54.00 | -10.0% | 0.620 | 100 | 1.25 |" in table
    assert "| **sparsegpt** | 2:4 | 0.5 | - | 62.00 | +3.3% | 0.600 | 80 | 1.00 |" in table
    assert "| llm-compressor sparsegpt | 2:4 | 0.5 | - | 60.00 |  | 0.600 | 90 | 1.12 |" in table
    assert "| **sparsegpt** | unstructured | 0.7 | - | 80.00 |  | 0.500 | 100 | 1.00 |" in table  # no peer at 0.7
    assert "absent" not in table and "llm-compressor wanda" not in table


def test_render_adds_the_alps_column_when_the_run_has_alps_rows():
    mod = _table_module()
    rows = [
        {"method": "llmc-sparsegpt", "pattern": "2:4", "options": {}, "ppl": 60.0, "debian_cloze_acc": 0.6,
         "prune_s": 90},
        {"method": "alps", "pattern": "2:4", "options": {}, "ppl": 50.0, "debian_cloze_acc": 0.65, "prune_s": 240},
        {"method": "sparsegpt", "pattern": "2:4", "options": {}, "ppl": 62.0, "debian_cloze_acc": 0.6, "prune_s": 80},
        {"method": "gblm-sparsegpt", "pattern": "2:4", "options": {"search": "admm"}, "ppl": 48.0,
         "debian_cloze_acc": 0.66, "prune_s": 200},
    ]
    table = mod.render({"dense_ppl": 20.0, "dense_debian_cloze_acc": 0.8, "rows": rows})
    assert "| vs llm-compressor SparseGPT | vs ALPS | debian_cloze acc |" in table
    assert "| **gblm-sparsegpt** | 2:4 | 0.5 | search=admm | 48.00 | -20.0% | -4.0% | 0.660 | 200 | 2.50 |" in table
    assert "| ALPS (peer) | 2:4 | 0.5 | - | 50.00 | -16.7% |  | 0.650 | 240 | 3.00 |" in table
    assert "| dense | - | 0 | - | 20.00 | | | 0.800 | | |" in table
