"""The Ray + DeepSpeed ZeRO-3 engine reproduces the single-process engine (tiny LLaMA, local Ray)."""

from __future__ import annotations

import math
import os

import pytest
import torch

ray = pytest.importorskip("ray")
pytest.importorskip("deepspeed")

from actors.distributed import run_ray, start_workers  # noqa: E402
from actors.group import GroupSpec  # noqa: E402
from orchestrator.engine.device import Placement  # noqa: E402
from orchestrator.engine.local import gradient_pass, run_local  # noqa: E402
from orchestrator.errors import UsageError  # noqa: E402
from orchestrator.evaluation.perplexity import perplexity  # noqa: E402
from orchestrator.inputs.config import RunConfig  # noqa: E402
from orchestrator.inputs.models import load_model, load_tokenizer, materialize  # noqa: E402

pytestmark = pytest.mark.integration

TEXT = (
    "The quick brown fox jumps over the lazy dog. Pruning removes weights that matter least; "
    "gradients and activations tell which ones. A placement group keeps workers together. "
    "Sharded statistics stay with their parameters, and every rank runs the same collectives. "
)
N_CALIB, SEQ = 7, 32  # odd on purpose: 4 + 3 sequences on two workers


def make_cfg(method: str = "gblm", pattern: str = "unstructured", norm: str = "l1") -> RunConfig:
    cfg = RunConfig()
    cfg.model.source = "tiny"
    cfg.pruning.method = method
    cfg.pruning.pattern = pattern
    cfg.pruning.gblm.norm = norm
    cfg.backend.kind = "ray"
    return cfg


@pytest.fixture(scope="module")
def cluster():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def setup(cluster):
    cfg = make_cfg()
    path = materialize(cfg.model)
    tok = load_tokenizer(path, cfg.model)
    ids = torch.tensor(tok(TEXT * 8)["input_ids"], dtype=torch.int64)
    windows = ids[: (ids.numel() // SEQ) * SEQ].reshape(-1, SEQ)  # (K, SEQ)
    assert windows.shape[0] >= N_CALIB + 3
    return path, windows[:N_CALIB], windows[N_CALIB : N_CALIB + 3]


@pytest.fixture(scope="module")
def groups(cluster):
    made = {w: start_workers(GroupSpec(w, num_threads=1, deepspeed=True)) for w in (1, 2)}
    yield made
    for g in made.values():
        g.shutdown()


def _local(cfg: RunConfig, path: str, calib: torch.Tensor):
    model = load_model(path, cfg.model)
    outcome = run_local(model, calib, cfg.pruning, progress=False)
    return model, outcome


def _published(res, path: str, cfg: RunConfig, run_dir):
    """The checkpoint the ranks wrote, assembled as the coordinator publishes it, loaded by plain transformers."""
    from transformers import AutoModelForCausalLM

    from orchestrator.inputs.models import model_skeleton
    from orchestrator.outputs.assemble import place_shards

    skeleton = model_skeleton(path, cfg.model)
    place_shards(run_dir, res.root, res.files, skeleton.config, skeleton.generation_config,
                 load_tokenizer(path, cfg.model))
    return AutoModelForCausalLM.from_pretrained(run_dir / "model").eval()


def test_live_zero3_groups_leave_no_shared_memory_names(groups):
    """DeepSpeed's CPU all-reduce creates a 69 MB ``/dev/shm`` segment per rank and never unlinks it:
    every run leaked them until the machine ran out of memory. The group unlinks them once joined."""
    import glob

    ports = {ray.get(a.__ray_call__.remote(lambda self: os.environ["MASTER_PORT"]))
             for g in groups.values() for a in g.actors}
    assert len(ports) == 2  # one process group per live group
    leaked = [f for f in glob.glob("/dev/shm/deepspeed_allreduce_buffer_*") if f.split("_")[-2] in ports]
    assert leaked == []  # the all-reduce through the mapped segments still works: the tests below


@pytest.mark.parametrize("method,pattern", [
    (m, p) for m in ("magnitude", "wanda", "sparsegpt", "gblm") for p in ("unstructured", "2:4", "4:8")
    if p != "4:8" or m in ("wanda", "sparsegpt")  # 4:8 takes the N:M path 2:4 takes; two methods keep it honest
])
def test_ray_matches_local(setup, groups, method, pattern, tmp_path):
    path, calib, held_out = setup
    cfg = make_cfg(method, pattern)
    local_model, local = _local(cfg, path, calib)
    local_ppl = perplexity(local_model, held_out)
    for workers, group in groups.items():
        res = run_ray(cfg, path, calib, progress=False, group=group)
        assert set(res.masks) == set(local.masks)
        assert set(res.weights) == set(local.masks)
        same = sum(int((res.masks[k] == local.masks[k]).sum()) for k in local.masks)
        total = sum(m.numel() for m in local.masks.values())
        assert same / total >= 0.999, f"{workers} workers: masks agree on {same / total:.5f}"
        ppl = perplexity(_published(res, path, cfg, tmp_path / f"x{workers}"), held_out)
        assert abs(ppl - local_ppl) / local_ppl < 0.005, (workers, ppl, local_ppl)
        assert len(res.outcome.layers) == len(local.layers)
        assert "block_pass" in res.outcome.phases and "startup" in res.outcome.phases
        assert ("gradient_pass" in res.outcome.phases) == (method == "gblm")
        assert len(res.memory) == workers
        for m in res.memory:
            assert m["peak_rss_bytes"] > 0 and m["model_state_bytes"] > 0
            peaks = m["peak_rss_bytes_by_phase"]  # each phase's own peak: never above the lifetime peak
            assert "load" in peaks and ("gradient_pass" in peaks) == (method == "gblm")
            assert ("block_pass" in peaks) == (method != "magnitude")  # from the captured block inputs on
            assert all(0 < v <= m["peak_rss_bytes"] for v in peaks.values()), (peaks, m["peak_rss_bytes"])
            # the allocated bytes (what the plan predicts) per phase too; their peaks are not below their start
            assert set(m["peak_allocated_bytes_by_phase"]) == set(peaks)
            assert m["peak_allocated_above_start_bytes"] > 0
        assert res.outcome.dtypes == {"forward_dtype": "float32", "grad_dtype": "float32"}  # `auto`, pinned fp32


@pytest.mark.parametrize("method", ["gblm"])  # the gradient pass and the block pass; sparsegpt: the GPU suite's row
def test_bf16_parameters_through_zero3_match_local(setup, groups, method, tmp_path):
    """``model.dtype: bfloat16`` (every 13B/70B config): partitions, gathers, the gradient pass and the written
    shards in bf16 on two ranks give the one-process masks, and the published checkpoint stays bf16."""
    path, calib, _ = setup
    cfg = make_cfg(method)
    cfg.model.dtype = "bfloat16"
    _, local = _local(cfg, path, calib)
    res = run_ray(cfg, path, calib, progress=False, group=groups[2])
    same = sum(int((res.masks[k] == local.masks[k]).sum()) for k in local.masks)
    assert same / sum(m.numel() for m in local.masks.values()) >= 0.999
    assert {w.dtype for w in res.weights.values()} == {torch.bfloat16}
    published = _published(res, path, cfg, tmp_path / "bf16")
    assert {p.dtype for p in published.parameters()} == {torch.bfloat16}


def test_parameters_before_block_zero_come_from_the_model(groups, tmp_path):
    """The block pass's block-0 inputs come from a plain shell built without initialisation: every parameter
    outside the decoder blocks is gathered into it, not only the token embedding (OPT adds learned positions;
    they were left random before, and no mask matched one process)."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    OPTForCausalLM(OPTConfig(vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                             max_position_embeddings=64, word_embed_proj_dim=32)).save_pretrained(tmp_path)
    cfg = make_cfg("wanda")
    cfg.model.source = str(tmp_path)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))  # (N, L)
    local = run_local(load_model(str(tmp_path), cfg.model), ids, cfg.pruning, progress=False)
    res = run_ray(cfg, str(tmp_path), ids, progress=False, group=groups[2])
    same = sum(int((res.masks[k] == local.masks[k]).sum()) for k in local.masks)
    assert same / sum(m.numel() for m in local.masks.values()) >= 0.999  # random positions: 0.93


@pytest.mark.parametrize("method,pattern,options", [
    ("wanda", "unstructured", {"reconstruct": "layer", "lstsq.rounds": 2}),
    ("magnitude", "4:8", {"reconstruct": "block", "lstsq.solver": "exact", "block_tune.epochs": 1}),
    ("gblm", "2:4", {"reconstruct": "layer", "gblm.weighting": "normalized", "gblm.relative_alpha": 0.5}),
    ("sparsegpt", "unstructured", {"allocation": "owl", "owl.threshold": 3, "reconstruct": "layer", "search": "admm"}),
    ("gblm-sparsegpt", "2:4", {"gblm.relative_alpha": 0.5, "reconstruct": "layer"}),
    ("gblm-sparsegpt", "4:8", {"gblm.relative_alpha": 0.5, "reconstruct": "layer", "search": "admm", "swaps": 3}),
    ("gblm", "unstructured", {"gblm.grad_samples": 3}),
    ("gblm-sparsegpt", "unstructured", {"gblm.grad_samples": 3, "gblm.relative_alpha": 0.5, "gblm.norm": "l2"}),
], ids=["wanda-layer-rounds", "magnitude-block-exact", "gblm-normalized-layer", "sparsegpt-owl-layer-admm",
        "gblm-sparsegpt", "gblm-sparsegpt-admm-swaps", "gblm-grad-samples", "gblm-sparsegpt-grad-samples-l2"])
def test_ray_matches_local_with_quality_options(setup, groups, method, pattern, options, tmp_path):
    """Reconstruction (layer and block), the ADMM search and swaps, OWL allocation and the gradient-aware options run
    the same on Ray x2 as in one process
    (the base methods are checked on x1 and x2 above; these options only change what the scorer computes)."""
    from orchestrator.inputs.loader import config_from_dict

    path, calib, held_out = setup
    cfg = config_from_dict(make_cfg(method, pattern).to_dict(), [f"pruning.{k}={v}" for k, v in options.items()])
    local_model, local = _local(cfg, path, calib)
    local_ppl = perplexity(local_model, held_out)
    local_weights = dict(local_model.named_parameters())
    res = run_ray(cfg, path, calib, progress=False, group=groups[2])
    same = sum(int((res.masks[k] == local.masks[k]).sum()) for k in local.masks)
    total = sum(m.numel() for m in local.masks.values())
    assert same / total >= 0.999, f"masks agree on {same / total:.5f}"
    for name, w in res.weights.items():  # the re-solved kept weights themselves, on rows with the same mask
        ref = local_weights[name].detach()
        rows = (res.masks[name] == local.masks[name]).all(dim=1)  # (out,)
        assert int(rows.sum()) >= 0.9 * rows.numel(), name
        assert float((w[rows] - ref[rows]).norm() / ref[rows].norm()) < 1e-2, name
    ppl = perplexity(_published(res, path, cfg, tmp_path), held_out)
    assert abs(ppl - local_ppl) / local_ppl < 0.005, (ppl, local_ppl)


@pytest.mark.parametrize("norm,kind,dtype", [("l1", "abs", "float32"), ("l2", "sq", "float32"),
                                             ("l1", "abs", "bfloat16")])
def test_grad_stats_sharded_and_equal_to_single_process(setup, groups, norm, kind, dtype):
    path, calib, _ = setup
    cfg = make_cfg("gblm", norm=norm)
    cfg.pruning.gblm.grad_dtype = dtype
    model = load_model(path, cfg.model)
    ref = gradient_pass(model, calib, (kind,), cfg.pruning.gblm.grad_scale, progress=False, dtype=dtype)
    res = run_ray(cfg, path, calib, progress=False, group=groups[2], keep_grad_partitions=True)
    world = 2
    parts = [m.pop("grad_partitions") for m in res.memory]
    for name, sums in ref.items():
        full_ref = sums[kind]
        numel = full_ref.numel()
        chunk = math.ceil(numel / world)
        for r in range(world):
            assert parts[r][name][kind].numel() == chunk  # each rank holds 1/N of the statistic
        full = torch.cat([parts[r][name][kind] for r in range(world)])[:numel].reshape(full_ref.shape)
        if dtype == "float32":
            torch.testing.assert_close(full, full_ref, rtol=1e-4, atol=1e-6 * float(full_ref.abs().max()))
        else:  # bf16 products on both sides, formed by different kernels: equal up to bf16 rounding
            assert float((full - full_ref).norm() / full_ref.norm()) < 1e-2, name
    expected = sum(math.ceil(s[kind].numel() / world) * 4 for s in ref.values())
    for m in res.memory:
        assert m["grad_stat_bytes"] == expected
    total_params = sum(p.numel() * p.element_size() for p in model.parameters())
    for m in res.memory:
        assert m["model_state_bytes"] <= math.ceil(total_params / world) + 4096


@pytest.mark.parametrize("workers", [1, 2])
def test_checkpointed_zero3_pass_gives_the_same_statistics(setup, groups, workers):
    """``backend.activation_checkpointing``: every block is recomputed in the ZeRO-3 backward (counted on each
    rank), and each rank's statistic partitions equal those of the plain pass (rtol 1e-5)."""
    path, calib, _ = setup
    parts = {}
    for on in (False, True):
        cfg = make_cfg("gblm")
        cfg.pruning.gblm.norm = "l2"  # grad_sq: the statistic most sensitive to a changed per-sample gradient
        cfg.backend.activation_checkpointing = on
        res = run_ray(cfg, path, calib, progress=False, group=groups[workers], keep_grad_partitions=True)
        steps = math.ceil(calib.shape[0] / workers)  # micro-batches of backend.grad_batch_size (4) sequences
        batches = math.ceil(steps / cfg.backend.grad_batch_size)
        for m in res.memory:
            assert m["recomputed_blocks"] == (2 * batches if on else 0), m["recomputed_blocks"]  # 2 blocks
        parts[on] = [m["grad_partitions"] for m in res.memory]
    for plain, ckpt in zip(parts[False], parts[True], strict=True):
        for name, by_kind in plain.items():
            want = by_kind["sq"]
            torch.testing.assert_close(ckpt[name]["sq"], want, rtol=1e-5, atol=1e-6 * float(want.abs().max()),
                                       msg=name)


@pytest.mark.parametrize("estimators", ["element1,vector", "element2"])
def test_saap_importance_on_ray_matches_one_process(setup, groups, estimators):
    """SAAP's group importance from ZeRO-3 workers (x1, x2): fused importance and stability within rtol 1e-4
    of the single-process path, the same groups kept, the same shrunk weights; each worker holds 1/N of the
    model and of the statistics."""
    import copy

    from actors.importance import run_ray_importance
    from orchestrator.inputs.loader import config_from_dict
    from orchestrator.structured.run import apply_pruning, compute_importance, distributed_importance

    path, calib, _ = setup
    cfg = config_from_dict(make_cfg().to_dict(), [
        "structured.enabled=true", "structured.target=0.3", "structured.minibatches=3", "structured.round_to=1",
        "structured.protect_first=0", "structured.protect_last=0", f"structured.estimators=[{estimators}]"])
    s = cfg.structured
    model = load_model(path, cfg.model)
    local = compute_importance(copy.deepcopy(model), calib, s)
    want = copy.deepcopy(model)
    want_report = apply_pruning(want, local, s)
    for workers, group in groups.items():
        def score(mods, shapes, ids, model_path=None, group=group):
            assert model_path is None  # no blocks removed: the workers load the run's model
            return run_ray_importance(cfg, path, ids, mods, shapes, group=group)

        imp, memory = distributed_importance(model, calib, s, score)
        assert set(imp.fused) == set(local.fused)
        for key, ref in local.fused.items():
            torch.testing.assert_close(imp.fused[key], ref, rtol=1e-4, atol=0, msg=f"{workers} workers: {key}")
            assert imp.cv[key] == pytest.approx(local.cv[key], rel=1e-4, abs=1e-9)
        got = copy.deepcopy(model)
        report = apply_pruning(got, imp, s)
        assert [r["removed"] for r in report["modules"]] == [r["removed"] for r in want_report["modules"]]
        for (name, a), (_, b) in zip(want.named_parameters(), got.named_parameters(), strict=True):
            assert torch.equal(a, b), name  # the same groups kept: the same shrunk weights
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        kinds = 2 if estimators == "element2" else 1  # grad_sum (and grad_sq), each for the mini-batch and the total
        partitions = sum(math.ceil(p.numel() / workers) for n, p in model.named_parameters()
                         if n.endswith("_proj.weight"))
        for m in memory:
            assert m["model_state_bytes"] <= math.ceil(total / workers) + 4096
            assert m["grad_stat_bytes"] == 2 * kinds * partitions * 4


def test_depth_global_compensated_structured_run_on_ray_matches_one_process(setup, groups):
    """Blocks removed first (the workers then score a checkpoint of the shortened model), global allocation
    and compensation: the ray x2 run keeps the same blocks and groups and gives the same weights."""
    import copy

    from orchestrator.groups import sharded_importance
    from orchestrator.inputs.loader import config_from_dict
    from orchestrator.structured.run import run_structured

    path, calib, _ = setup
    cfg = config_from_dict(make_cfg().to_dict(), [
        "structured.enabled=true", "structured.target=0.6", "structured.minibatches=2", "structured.round_to=4",
        "structured.protect_first=0", "structured.protect_last=0", "structured.depth_blocks=1",
        "structured.allocation=global", "structured.compensate=true", "backend.workers=2"])
    model = load_model(path, cfg.model)
    local_cfg = copy.deepcopy(cfg)
    local_cfg.backend.kind = "local"
    want, want_rep = run_structured(local_cfg, copy.deepcopy(model), calib)
    score = sharded_importance(cfg, path, False, groups[2])
    got, got_rep = run_structured(cfg, copy.deepcopy(model), calib, sharded_importance=score)
    assert len(got_rep["importance_workers"]) == 2
    assert got_rep["depth"]["blocks_removed"] == want_rep["depth"]["blocks_removed"]
    assert [r["removed"] for r in got_rep["modules"]] == [r["removed"] for r in want_rep["modules"]]
    assert got_rep["layer_sizes"] == want_rep["layer_sizes"]
    assert 0.59 < got_rep["removed_fraction"] < 0.61  # half from the block (of 2), the rest from groups
    for (name, a), (_, b) in zip(want.named_parameters(), got.named_parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("method", ["wanda", "gblm"])
def test_fewer_samples_than_workers(setup, groups, method):
    """One sequence on two workers: rank 1 holds no data but still takes part in every collective."""
    path, calib, _ = setup
    cfg = make_cfg(method)
    _, local = _local(cfg, path, calib[:1])
    res = run_ray(cfg, path, calib[:1], progress=False, group=groups[2])
    same = sum(int((res.masks[k] == local.masks[k]).sum()) for k in local.masks)
    assert same / sum(m.numel() for m in local.masks.values()) >= 0.999


def test_too_many_workers_is_a_clear_error(cluster):
    with pytest.raises(UsageError, match=r"backend\.workers: 64"):
        start_workers(GroupSpec(64, deepspeed=True))


MULTI_NODE = r"""
import sys, torch, ray
from ray.cluster_utils import Cluster
from actors.distributed import run_ray
from actors.distributed import start_workers
from actors.group import GroupSpec
from orchestrator.inputs.config import RunConfig
from orchestrator.engine.local import run_local
from orchestrator.inputs.models import load_model

path, calib_file = sys.argv[1], sys.argv[2]
calib = torch.load(calib_file, weights_only=True)
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"node_a": 1}})
cluster.add_node(num_cpus=1, resources={"node_b": 1})
ray.init(address=cluster.address, log_to_driver=False)
cfg = RunConfig()
cfg.model.source = "tiny"
cfg.pruning.method = "wanda"
group = start_workers(GroupSpec(2, strategy="STRICT_SPREAD", num_threads=1, deepspeed=True))
try:
    ids = {info.node_id for info in group.infos}
    assert len(ids) == 2, ids
    res = run_ray(cfg, path, calib, progress=False, group=group)
finally:
    group.shutdown()
    ray.shutdown()
    cluster.shutdown()
local = run_local(load_model(path, cfg.model), calib, cfg.pruning, progress=False)
same = sum(int((res.masks[k] == local.masks[k]).sum()) for k in local.masks)
total = sum(m.numel() for m in local.masks.values())
assert same / total >= 0.999, same / total
print("OK", len(ids), same / total)
"""


def test_strict_spread_two_nodes(setup, tmp_path):
    """Two in-process Ray nodes: STRICT_SPREAD puts one worker on each, and the result still matches."""
    import subprocess
    import sys

    path, calib, _ = setup
    calib_file = tmp_path / "calib.pt"
    torch.save(calib, calib_file)
    script = tmp_path / "multi_node.py"
    script.write_text(MULTI_NODE)
    proc = subprocess.run([sys.executable, str(script), path, str(calib_file)], capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0 and "OK 2" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.mark.parametrize("sequential", [False, True], ids=["one-pass", "sequential"])
def test_ray_sweep_uses_one_gradient_pass_and_matches_the_local_sweep(setup, groups, monkeypatch, sequential):
    """Three sparsities on 2 workers: one distributed gradient pass (counted), each candidate at its
    sparsity, masks equal to the local sweep's."""
    import dataclasses

    import actors.sweep as ray_sweep
    from orchestrator.engine.sweep import run_sweep

    path, calib, _ = setup
    cfg = make_cfg("gblm")
    cfg.pruning = dataclasses.replace(cfg.pruning, sweep=[0.3, 0.5, 0.7], sequential=sequential)
    passes = []
    real = ray_sweep.gradient_pass
    monkeypatch.setattr(ray_sweep, "gradient_pass", lambda *a, **k: passes.append(1) or real(*a, **k))
    res = ray_sweep.run_ray_sweep(cfg, path, calib, progress=False, group=groups[2])
    assert len(passes) == 1 and res.gradient_passes == 1
    assert res.activation_passes == (3 if sequential else 1)
    local = run_sweep(load_model(path, cfg.model), calib, cfg.pruning, progress=False)
    assert [s for s, _ in res.candidates] == [c.sparsity for c in local.candidates] == [0.3, 0.5, 0.7]
    for (sparsity, cand), ref in zip(res.candidates, local.candidates, strict=True):
        masks, weights = cand.masks, cand.weights  # read from the files the ranks wrote
        assert {r["name"] for r in cand.outcome.layers} == set(masks)
        assert any(p.endswith("model-outside.safetensors") for p in cand.files)  # a whole checkpoint
        total = sum(m.numel() for m in masks.values())
        reached = sum(int(m.sum()) for m in masks.values()) / total
        assert abs(reached - sparsity) < 0.02, (sparsity, reached)
        same = sum(int((masks[k] == ref.outcome.masks[k]).sum()) for k in masks) / total
        assert same >= 0.999, (sparsity, same)
        for name, w in weights.items():  # the returned weights are the masked weights
            assert int((w[masks[name]] != 0).sum()) == 0, name


def test_auto_dtypes_resolve_on_the_workers_and_match_local_bf16(setup, cluster, monkeypatch):
    """``auto`` becomes bf16 where the workers compute it natively (forced here through the driver's
    environment, which the group hands to its actors): the run is a bf16 run, equal to the local bf16 run."""
    path, calib, _ = setup
    monkeypatch.setenv("RAYPRUNE_NATIVE_BF16", "1")
    cfg = make_cfg("gblm", "unstructured")
    group = start_workers(GroupSpec(1, num_threads=1, deepspeed=True))
    try:
        assert group.native_bf16
        res = run_ray(cfg, path, calib, progress=False, group=group)
    finally:
        group.shutdown()
    assert res.outcome.dtypes == {"forward_dtype": "bfloat16", "grad_dtype": "bfloat16"}
    explicit = make_cfg("gblm", "unstructured")
    explicit.pruning.gblm.grad_dtype = "bfloat16"
    local = run_local(load_model(path, cfg.model), calib, explicit.pruning, Placement.of("cpu", "bfloat16"),
                      progress=False)
    fp32 = run_local(load_model(path, cfg.model), calib, make_cfg("gblm").pruning, progress=False)
    total = sum(m.numel() for m in local.masks.values())
    agree = sum(int((res.masks[k] == local.masks[k]).sum()) for k in local.masks) / total
    vs_fp32 = sum(int((fp32.masks[k] == local.masks[k]).sum()) for k in local.masks) / total
    assert agree >= 0.999 and agree > vs_fp32, (agree, vs_fp32)  # the bf16 run, not the fp32 one
