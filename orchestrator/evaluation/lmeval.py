"""lm-eval-harness tasks through lm-eval's own model interface (optional extra ``eval``).

The model under evaluation is wrapped in ``lm_eval.models.huggingface.HFLM`` (an already-loaded
model object, no reloading) and each task runs through ``lm_eval.simple_evaluate``, one task at
a time so that a task whose data cannot be fetched is reported as skipped instead of ending the
whole evaluation. When the Hugging Face hub is not reachable (probed once, a few seconds at
most), datasets are loaded in offline mode: cached copies still work, missing ones fail at once
instead of retrying for half a minute.

Local JSONL tasks (:func:`orchestrator.evaluation.zeroshot.load_task`'s format) run through lm-eval as well,
from a task config built in memory (``dataset_path: json``); they score exactly what
:func:`orchestrator.evaluation.zeroshot.score_examples` scores (context as text, each choice as the
continuation with no delimiter added, ``acc`` and ``acc_norm``).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from orchestrator.errors import UsageError

log = logging.getLogger(__name__)

STANDARD_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
# where lm-eval 0.4 keeps their configs: indexing only these takes ~0.1 s instead of ~12 s for all tasks
TASK_DIRS = {"boolq": "super_glue/boolq", "piqa": "piqa", "hellaswag": "hellaswag", "winogrande": "winogrande",
             "arc_easy": "arc", "arc_challenge": "arc", "openbookqa": "openbookqa"}
METRICS = ("acc", "acc_norm")


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UsageError("lm-eval tasks need the optional extra: pip install 'rayprune[eval]'") from None


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hugging Face hub opens within ``timeout`` seconds.

    ``HF_HUB_OFFLINE=1`` in the environment counts as unreachable.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


@contextmanager
def hub_offline(enabled: bool) -> Iterator[None]:
    """Temporarily put ``huggingface_hub`` and ``datasets`` in offline mode (cached data only)."""
    if not enabled:
        yield
        return
    import datasets.config as dconf
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE, dconf.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = dconf.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, dconf.HF_HUB_OFFLINE = saved


def local_task_config(name: str, path: str | Path) -> dict:
    """An lm-eval task config (as its YAML would hold) for a local JSONL multiple-choice task.

    Args:
        name: the task's name in lm-eval's results.
        path: JSONL file with ``context``, ``choices`` and ``label`` per line (validated here), or the
            name of a builtin task (``debian_cloze``).
    """
    from orchestrator.evaluation.zeroshot import load_task, task_path

    load_task(path)  # clear errors before lm-eval sees the file
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(task_path(path).resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "context",  # feature names: used verbatim (no Jinja, whitespace kept)
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "target_delimiter": "",  # the choice string is the whole continuation, as in zeroshot.py
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in METRICS],
    }


def _unreachable(exc: BaseException) -> str | None:
    """A short reason when ``exc`` (or its chain) says the task's data could not be fetched."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        name = type(exc).__name__
        text = str(exc)
        if (isinstance(exc, ConnectionError) or name in ("OfflineModeIsEnabled", "LocalEntryNotFoundError",
                                                         "DatasetNotFoundError", "HfHubHTTPError")
                or "not cached" in text or "Couldn't reach" in text):
            return f"{name}: {text.splitlines()[0][:160]}" if text else name
        exc = exc.__cause__ or exc.__context__
    return None


def _task_manager(tasks: Sequence[str]):
    """A ``TaskManager`` that indexes the known tasks' folders only, or all of lm-eval's tasks."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    root = Path(lm_eval.__file__).parent / "tasks"
    dirs = sorted({str(root / TASK_DIRS[t]) for t in tasks if t in TASK_DIRS and (root / TASK_DIRS[t]).is_dir()})
    if tasks and len(dirs) == len({TASK_DIRS.get(t) for t in tasks}):
        return TaskManager(include_path=dirs, include_defaults=False)
    return TaskManager(include_defaults=bool(tasks))


def _summary(results: dict, name: str) -> dict:
    row = results["results"][name]
    out: dict = {"status": "ok"}
    for m in METRICS:
        if f"{m},none" in row:
            out[m] = float(row[f"{m},none"])
            stderr = row.get(f"{m}_stderr,none")
            out[f"{m}_stderr"] = float(stderr) if isinstance(stderr, (int, float)) else None
    n = results.get("n-samples", {}).get(name, {})
    out["n"] = int(n.get("effective", n.get("original", 0)))
    return out


def run_lm_eval(model, tokenizer, tasks: Sequence[str] = STANDARD_TASKS,
                local_tasks: dict[str, str | Path] | None = None, limit: int | None = None, batch_size: int = 8,
                num_fewshot: int = 0, hub_timeout: float = 3.0) -> dict[str, dict]:
    """Evaluate a loaded model on lm-eval tasks, skipping those whose data is not reachable.

    Args:
        model: a loaded ``transformers`` causal LM (eval mode, any device).
        tokenizer: its tokenizer.
        tasks: lm-eval task names (``STANDARD_TASKS`` by default).
        local_tasks: extra ``{name: jsonl_path}`` tasks in :func:`orchestrator.evaluation.zeroshot.load_task`'s format.
        limit: evaluate only the first ``limit`` examples of each task.
        batch_size: lm-eval's batch size.
        num_fewshot: in-context examples per prompt (0: zero-shot).
        hub_timeout: seconds for the one reachability probe of the hub.

    Returns:
        ``{task: {"status": "ok", "acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}}``, or for a
        task whose data could not be fetched ``{"status": "skipped", "reason": "skipped: <task>: data not
        reachable (...)"}``.

    Raises:
        UsageError: lm-eval is not installed, or a task name is unknown to lm-eval.
    """
    _require_lm_eval()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    specs: dict[str, str | dict] = {t: t for t in tasks}
    specs.update({name: local_task_config(name, path) for name, path in (local_tasks or {}).items()})
    manager = _task_manager(tasks)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UsageError(f"lm-eval tasks: unknown task(s) {', '.join(unknown)} (see `lm-eval ls tasks`)")
    offline = bool(tasks) and not hub_reachable(hub_timeout)
    if offline:
        log.warning("the Hugging Face hub is not reachable: lm-eval tasks use cached data only")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal")
    out: dict[str, dict] = {}
    for name, spec in specs.items():
        with hub_offline(offline):
            try:
                loaded = manager.load([spec])["tasks"]  # downloads (or reads the cache of) the task's data
            except Exception as exc:  # noqa: BLE001 - classified below; anything else is a real error
                reason = _unreachable(exc)
                if reason is None:
                    raise
                out[name] = {"status": "skipped", "reason": f"skipped: {name}: data not reachable ({reason})"}
                log.warning("%s", out[name]["reason"])
                continue
            res = simple_evaluate(model=lm, tasks=list(loaded.values()), num_fewshot=num_fewshot, limit=limit,
                                  task_manager=manager, log_samples=False, verbosity="WARNING")
        for leaf in loaded:
            out[leaf] = _summary(res, leaf)
            log.info("lm-eval %s: %s", leaf, {k: v for k, v in out[leaf].items() if k != "status"})
    return out
