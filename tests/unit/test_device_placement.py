"""Every tensor of the block step, the gradient passes, evaluation, structured importance and LoRA
recovery lives on the device it was given.

A CPU-only torch has no second device, so the checks run on ``fakegpu`` (:mod:`tests.fakegpu`):
torch's PrivateUse1 backend served from Python, whose kernels raise as soon as a ``fakegpu``
tensor meets a CPU tensor, exactly as CUDA kernels do. The whole scenario runs in one subprocess
(the backend is registered for the life of a process, so it must not leak into other tests);
it prints one JSON line of results that the tests below assert on. Each engine entry point runs
once on the CPU and once on ``fakegpu`` from the same seeded model, and the results must agree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r'''
import copy, json, sys
import torch
from tests import fakegpu
dev = fakegpu.install()
mode = fakegpu.FakeGpuMode(); mode.__enter__()

from orchestrator.engine.block_step import StepContext, block_step
from orchestrator.engine.blocks import capture_block_inputs, decoder_blocks
from orchestrator.engine.device import Placement, to_cpu
from orchestrator.engine.local import block_sequential, gradient_pass, pruned_weight_names
from orchestrator.engine.sweep import run_sweep
from orchestrator.evaluation.perplexity import window_nll
from orchestrator.evaluation.zeroshot import score_examples
from orchestrator.inputs.config import PruningConfig, StructuredConfig, StructuredRecoveryConfig, TinyModelConfig
from orchestrator.inputs.models import build_tiny_llama, byte_tokenizer
from orchestrator.pruning.methods import gradient_kinds
from orchestrator.pruning.stats import ActivationStats

torch.manual_seed(0)
tiny = build_tiny_llama(TinyModelConfig(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, seed=0)).eval()
ids = torch.randint(0, tiny.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(1))  # (N, L) on CPU
CPU, GPU = Placement(), Placement(dev)
out = {}

def on(d):
    return copy.deepcopy(tiny).to(d)

def all_on(tree, device_type):
    leaves = []
    def walk(x):
        if isinstance(x, torch.Tensor): leaves.append(x.device.type == device_type)
        elif isinstance(x, dict): [walk(v) for v in x.values()]
        elif isinstance(x, (list, tuple)): [walk(v) for v in x]
    walk(tree)
    return bool(leaves) and all(leaves)

# gradient pass (local engine): statistics on the model's device, equal to the CPU's
g_cpu = gradient_pass(on("cpu"), ids, ("abs", "sq", "sum"), 100.0, progress=False)
g_dev = gradient_pass(on(dev), ids.to(dev), ("abs", "sq", "sum"), 100.0, progress=False)
out["grad_on_device"] = all_on(g_dev, "fakegpu")
out["grad_max_rel"] = max(float(((g_dev[n][k].cpu() - g_cpu[n][k]).abs().max() / g_cpu[n][k].abs().max()))
                          for n in g_cpu for k in g_cpu[n])
g_ckpt = gradient_pass(on(dev), ids.to(dev), ("abs", "sq", "sum"), 100.0, progress=False, checkpoint=True)
out["grad_ckpt_on_device"] = all_on(g_ckpt, "fakegpu")
out["grad_ckpt_max_rel"] = max(float(((g_ckpt[n][k].cpu() - g_cpu[n][k]).abs().max() / g_cpu[n][k].abs().max()))
                               for n in g_cpu for k in g_cpu[n])

# the block step through the local engine, every method and pattern (ids arrive on the CPU)
out["block"] = {}
for method in ("magnitude", "wanda", "sparsegpt", "gblm"):
    for pattern in ("unstructured", "2:4"):
        cfg = PruningConfig(method=method, pattern=pattern)
        kinds = gradient_kinds(method, cfg.gblm.norm)
        a = block_sequential(on("cpu"), ids, cfg, g_cpu if kinds else None, CPU, progress=False)
        model = on(dev)
        b = block_sequential(model, ids, cfg, g_dev if kinds else None, GPU, progress=False)
        same = sum(int((a.masks[k] == b.masks[k]).sum()) for k in a.masks) / sum(m.numel() for m in a.masks.values())
        params = dict(model.named_parameters())
        out["block"][f"{method}/{pattern}"] = {
            "masks_equal": same, "masks_on_cpu": all_on(b.masks, "cpu"),
            "weights_on_device": all(params[n].device.type == "fakegpu" for n in pruned_weight_names(model))}

# a sweep (non-sequential: one pass, several candidates)
cfg = PruningConfig(method="wanda", sweep=[0.3, 0.6], sequential=False)
sw = run_sweep(on(dev), ids, cfg, GPU, progress=False)
out["sweep_sparsities"] = [round(float(torch.cat([m.reshape(-1) for m in c.outcome.masks.values()]).float().mean()), 3)
                           for c in sw.candidates]
out["sweep_masks_on_cpu"] = all(all_on(c.outcome.masks, "cpu") for c in sw.candidates)

# the step's collectives see device tensors only (NCCL accepts nothing else)
seen = []
def reduce(t):
    seen.append(t.device.type)
model = on(dev)
hidden, kwargs = capture_block_inputs(model, ids.to(dev))
block_step(decoder_blocks(model)[0], hidden, kwargs, StepContext(PruningConfig(method="sparsegpt"), GPU, reduce=reduce))
out["reduced_on_device"] = bool(seen) and all(s == "fakegpu" for s in seen)

# negative controls: what a forgotten .to(device) does here
try:
    block_step(decoder_blocks(model)[1], hidden.cpu(), kwargs, StepContext(PruningConfig(method="wanda"), GPU))
    out["cpu_hidden_raises"] = False
except RuntimeError:
    out["cpu_hidden_raises"] = True
try:
    ActivationStats(64).update(torch.randn(2, 3, 64, device=dev))  # statistics left on the CPU
    out["cpu_stats_raise"] = False
except RuntimeError:
    out["cpu_stats_raise"] = True

# evaluation: perplexity and multiple choice on the model's device, numbers equal to the CPU's
tok = byte_tokenizer()
nll_cpu = window_nll(on("cpu"), ids)
nll_dev = window_nll(on(dev), ids)
out["nll"] = [nll_cpu[0], nll_dev[0], nll_cpu[1], nll_dev[1]]
examples = [{"context": "the quick brown", "choices": [" fox jumps", " dog", " model learns"], "label": 0},
            {"context": "python documentation", "choices": [" and debian", " tokens"], "label": 1}]
mc_cpu = score_examples(on("cpu"), tok, examples)
mc_dev = score_examples(on(dev), tok, examples)
out["mc_loglik"] = [[x for r in mc_cpu for x in r["loglik"]], [x for r in mc_dev for x in r["loglik"]]]

# structured importance (the local gradient pass per mini-batch) and LoRA recovery
from orchestrator.structured.recovery import train
from orchestrator.structured.run import compute_importance
s = StructuredConfig(minibatches=2)
imp_cpu = compute_importance(on("cpu"), ids, s)
imp_dev = compute_importance(on(dev), ids, s)
out["importance_on_device"] = all_on(imp_dev.fused, "fakegpu")
out["importance_max_rel"] = max(float(((imp_dev.fused[k].cpu() - v).abs().max() / v.abs().max()))
                                for k, v in imp_cpu.fused.items())
r = StructuredRecoveryConfig(steps=2, batch_size=2, seq_len=16, forward_dtype="float32", blocks_per_group=2)
m_cpu, ad_cpu, rep_cpu = train(on("cpu"), ids, r)
m_dev, ad_dev, rep_dev = train(on(dev), ids.to(dev), r)
out["recovery_losses"] = [rep_cpu["phases"][0]["losses"], rep_dev["phases"][0]["losses"]]
out["recovery_adapters_on_device"] = all_on([a[1] for a in ad_dev], "fakegpu")
out["to_cpu"] = all_on(to_cpu(ad_dev), "cpu")

# the Ray worker's gradient folding (ShardedGradStats, one rank, no DeepSpeed engine)
import torch.distributed as dist
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
from actors.zero3 import ShardedGradStats
model = on(dev)
mods = dict(model.named_modules())
names = pruned_weight_names(model)
for offload in (False, True):  # partitions on the device, or in host memory
    stats = ShardedGradStats({n: mods[n.removesuffix(".weight")] for n in names}, ("abs",), 100.0, dev,
                             offload=offload)
    emb = model.get_input_embeddings().register_forward_hook(lambda _m, _i, o: o.requires_grad_())
    for i in range(ids.shape[0]):
        stats.set_batch(torch.ones(1, device=dev))
        x = ids[i : i + 1].to(dev)
        model(x, labels=x, use_cache=False).loss.backward()
        stats.flush()
    emb.remove()
    stats.remove()
    key = "offloaded" if offload else "sharded"
    out[f"{key}_on_device"] = all_on(stats.chunks, "fakegpu")
    out[f"{key}_on_cpu"] = all_on(stats.chunks, "cpu")
    out[f"{key}_max_rel"] = max(float(((stats.chunks[n]["abs"].cpu()[: g_cpu[n]["abs"].numel()]
                                        - g_cpu[n]["abs"].reshape(-1)).abs().max() / g_cpu[n]["abs"].abs().max()))
                                for n in names)
    gathered = stats.gather_to(names[0], "abs")  # the scorer's collective runs on the device either way
    out[f"{key}_gathered_on_device"] = gathered.device.type == "fakegpu"
dist.destroy_process_group()
print("RESULT " + json.dumps(out))
'''


@pytest.fixture(scope="module")
def result() -> dict:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_negative_controls_fail_like_a_gpu(result):
    """The check is real: a CPU tensor reaching a fakegpu kernel raises."""
    assert result["cpu_hidden_raises"]
    assert result["cpu_stats_raise"]


def test_gradient_pass_on_device(result):
    assert result["grad_on_device"]
    assert result["grad_max_rel"] < 1e-5


def test_checkpointed_gradient_pass_on_device(result):
    assert result["grad_ckpt_on_device"]
    assert result["grad_ckpt_max_rel"] < 1e-5


@pytest.mark.parametrize("case", [f"{m}/{p}" for m in ("magnitude", "wanda", "sparsegpt", "gblm")
                                  for p in ("unstructured", "2:4")])
def test_block_step_on_device(result, case):
    row = result["block"][case]
    assert row["masks_equal"] >= 0.999, row
    assert row["masks_on_cpu"] and row["weights_on_device"], row


def test_sweep_and_collectives_on_device(result):
    # per-row rule: floor(in * s) of each row, so a little below s on the tiny widths
    assert all(abs(a - b) < 0.01 for a, b in zip(result["sweep_sparsities"], [0.3, 0.6], strict=True))
    assert result["sweep_masks_on_cpu"]
    assert result["reduced_on_device"]


def test_evaluation_on_device(result):
    cpu, dev, tok_cpu, tok_dev = result["nll"]
    assert tok_cpu == tok_dev
    assert abs(dev - cpu) <= 1e-4 * abs(cpu)
    for a, b in zip(*result["mc_loglik"], strict=True):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a))


def test_structured_importance_and_recovery_on_device(result):
    assert result["importance_on_device"]
    assert result["importance_max_rel"] < 1e-4
    cpu, dev = result["recovery_losses"]
    assert len(cpu) == len(dev) == 2
    for a, b in zip(cpu, dev, strict=True):
        assert abs(a - b) <= 1e-4 * abs(a)
    assert result["recovery_adapters_on_device"] and result["to_cpu"]


def test_worker_gradient_statistics_on_device(result):
    assert result["sharded_on_device"] and not result["sharded_on_cpu"]
    assert result["sharded_max_rel"] < 1e-5
    assert result["sharded_gathered_on_device"]


def test_offloaded_worker_statistics_stay_in_host_memory(result):
    """``backend.offload_stats``: the partitions live on the CPU while every collective sees device tensors."""
    assert result["offloaded_on_cpu"] and not result["offloaded_on_device"]
    assert result["offloaded_max_rel"] < 1e-5
    assert result["offloaded_gathered_on_device"]
