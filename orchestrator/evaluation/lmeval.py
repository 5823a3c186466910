"""lm-eval-harness tasks through lm-eval's own model interface (optional extra ``eval``).

The model under evaluation is wrapped in ``lm_eval.models.huggingface.HFLM`` (an already-loaded
model object, no reloading) and each task runs through ``lm_eval.simple_evaluate``, one task at
a time so that a task whose data cannot be fetched is reported as skipped instead of ending the
whole evaluation. When the Hugging Face hub is not reachable (probed once, a few seconds at
most), datasets are loaded in offline mode: cached copies still work, missing ones fail at once
instead of retrying for half a minute.

An ``eval.tasks`` entry names an lm-eval task as ``lm_eval:NAME_OR_YAML[@num_fewshot=K,limit=N]``
(:func:`parse_task_spec`): a task (or group, or tag) name lm-eval knows, or a task YAML file
(``.yaml``/``.yml``), loaded with its folder as lm-eval's ``include_path`` so ``!function``
helpers next to it work. Every metric a task's results define is reported, with its standard error
(:func:`summarize`).

Local JSONL tasks (:func:`orchestrator.evaluation.zeroshot.load_task`'s format) run through lm-eval as well,
from a task config built in memory (``dataset_path: json``); they score exactly what
:func:`orchestrator.evaluation.zeroshot.score_examples` scores (context as text, each choice as the
continuation with no delimiter added, ``acc`` and ``acc_norm``).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from orchestrator.errors import UsageError

log = logging.getLogger(__name__)

PREFIX = "lm_eval:"
STANDARD_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
# where lm-eval 0.4 keeps their configs: indexing only these takes ~0.1 s instead of ~12 s for all tasks
TASK_DIRS = {"boolq": "super_glue/boolq", "piqa": "piqa", "hellaswag": "hellaswag", "winogrande": "winogrande",
             "arc_easy": "arc", "arc_challenge": "arc", "openbookqa": "openbookqa"}
METRICS = ("acc", "acc_norm")
TASK_FILE_SUFFIXES = (".yaml", ".yml")
SPEC_OPTIONS = {"num_fewshot": 0, "limit": 1}  # option -> smallest value
RESERVED = ("status", "source", "n", "num_fewshot", "reason")  # result keys that are not metrics


@dataclass(frozen=True)
class LmEvalTask:
    """One lm-eval task of ``eval.tasks``: a name or task YAML file, with its own settings.

    Attributes:
        name: an lm-eval task, group or tag name, or the path of a task YAML file.
        num_fewshot: in-context examples per prompt (None: the run's default, ``eval.num_fewshot``).
        limit: evaluate only the first ``limit`` examples (None: the run's default, ``eval.task_limit``).
    """

    name: str
    num_fewshot: int | None = None
    limit: int | None = None

    @property
    def is_file(self) -> bool:
        """Whether :attr:`name` is a task YAML file (by its suffix)."""
        return self.name.lower().endswith(TASK_FILE_SUFFIXES)

    def options(self) -> str:
        """The settings as the spec writes them after ``@`` (``num_fewshot=K,limit=N``; unset ones left out)."""
        return ",".join(f"{k}={v}" for k in SPEC_OPTIONS if (v := getattr(self, k)) is not None)

    def __str__(self) -> str:
        return self.name + (f"@{self.options()}" if self.options() else "")

    def resolved(self, num_fewshot: int = 0, limit: int | None = None) -> LmEvalTask:
        """This task with the defaults filled in where it names no value of its own, a task file made absolute.

        Raises:
            UsageError: a task file that does not exist, or has no ``task:`` name.
        """
        name = self.name
        if self.is_file:
            path = Path(name).expanduser()
            if not path.is_file():
                raise UsageError(f"eval.tasks: '{PREFIX}{self}': task file {name!r} not found")
            yaml_task_name(path)  # a clear error now rather than after pruning
            name = str(path.resolve())
        return LmEvalTask(name, num_fewshot if self.num_fewshot is None else self.num_fewshot,
                          limit if self.limit is None else self.limit)

    def identity(self) -> str:
        """What decides this task's numbers, as one string (a task file's content digest included)."""
        if not self.is_file:
            return str(self)
        digest = hashlib.sha256(Path(self.name).read_bytes()).hexdigest()[:16]
        return f"{self} sha256:{digest}"


def parse_task_spec(entry: str) -> LmEvalTask:
    """Parse ``[lm_eval:]NAME_OR_YAML[@num_fewshot=K,limit=N]`` (the syntax only: no file is read).

    Args:
        entry: an ``eval.tasks`` entry, with or without the ``lm_eval:`` prefix. A path containing ``@``
            (and no options) is taken whole when that file exists.

    Raises:
        UsageError: an empty name, an unknown or repeated option, or a value that is not a whole number
            in range (``num_fewshot`` >= 0, ``limit`` >= 1); one line naming ``eval.tasks`` and the entry.
    """
    rest = entry[len(PREFIX):] if entry.startswith(PREFIX) else entry
    shown = f"eval.tasks: {PREFIX + rest!r}"
    name, sep, opts = rest.rpartition("@") if "@" in rest else (rest, "", "")
    if sep and rest.lower().endswith(TASK_FILE_SUFFIXES) and Path(rest).expanduser().is_file():
        name, sep, opts = rest, "", ""
    name = name.strip()
    if not name:
        raise UsageError(f"{shown}: no task name (expected {PREFIX}NAME_OR_YAML[@num_fewshot=K,limit=N])")
    values: dict[str, int] = {}
    for item in opts.split(",") if sep else []:
        key, eq, value = (s.strip() for s in item.partition("="))
        if key not in SPEC_OPTIONS or not eq:
            what = f"unknown option {key!r}" if key not in SPEC_OPTIONS else f"option {key!r} has no value"
            raise UsageError(f"{shown}: {what} (options: num_fewshot=K, limit=N, comma-separated after '@')")
        if key in values:
            raise UsageError(f"{shown}: option {key!r} given twice")
        if not (value.isascii() and value.isdigit()) or int(value) < SPEC_OPTIONS[key]:
            raise UsageError(f"{shown}: {key}={value!r} must be a whole number >= {SPEC_OPTIONS[key]}")
        values[key] = int(value)
    return LmEvalTask(name, **values)


def resolve_tasks(entries: Sequence[str], num_fewshot: int = 0, limit: int | None = None) -> list[LmEvalTask]:
    """The lm-eval tasks of ``eval.tasks`` (entries starting with ``lm_eval:``), parsed, with defaults filled in.

    Args:
        entries: ``eval.tasks`` (entries without the prefix are not lm-eval tasks and are left out).
        num_fewshot: the default number of in-context examples (``eval.num_fewshot``).
        limit: the default number of examples per task (``eval.task_limit``; None: all).

    Raises:
        UsageError: a malformed entry, or a task file that does not exist or names no task.
    """
    return [parse_task_spec(e).resolved(num_fewshot, limit) for e in entries if e.startswith(PREFIX)]


def yaml_task_name(path: str | Path) -> str:
    """The ``task:`` name of an lm-eval task YAML (a group file's ``group:``); tags like ``!function`` are
    read as plain values, nothing is imported.

    Raises:
        UsageError: the file is not YAML or names no task.
    """
    import yaml

    class Loader(yaml.SafeLoader):
        """A safe loader that reads any ``!tag`` as nothing."""

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    try:
        doc = yaml.load(Path(path).read_text(), Loader=Loader)  # a SafeLoader: no object is built
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(f"eval.tasks: task file {str(path)!r} is not readable YAML "
                         f"({str(exc).splitlines()[0]})") from None
    doc = doc if isinstance(doc, dict) else {}
    for key in ("task", "group"):
        if isinstance(doc.get(key), str) and doc[key].strip():
            return doc[key]
    raise UsageError(f"eval.tasks: task file {str(path)!r} has no `task:` name")


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


def _file_manager(path: Path):
    """A ``TaskManager`` that indexes the task file's folder (and below) only, as lm-eval's ``--include_path``
    would: the tasks a group file there names. The file itself is loaded by its path (``.yml`` too, which
    lm-eval's index skips); its ``!function`` helpers are imported from its folder."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(path.parent)], include_defaults=False)


def _number(value) -> float | None:
    """A finite float, or None (lm-eval's ``"N/A"``, NaN, infinities)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def summarize(results: dict, name: str, num_fewshot: int | None = None) -> dict:
    """Every metric of task ``name`` in ``simple_evaluate``'s ``results``, with its standard error.

    Args:
        results: what ``lm_eval.simple_evaluate`` returned.
        name: a leaf task's name.
        num_fewshot: reported when the results do not say (their ``n-shot``).

    Returns:
        ``{"status": "ok", <metric>: float, <metric>_stderr: float | None, ..., "n", "num_fewshot"}``: a
        results key ``"<metric>,<filter>"`` becomes ``<metric>`` (``<metric>,<filter>`` for a filter other than
        ``none``); its stderr key likewise. Non-finite values and ``"N/A"`` become None.
    """
    row = results["results"][name]
    out: dict = {"status": "ok"}
    for key, value in row.items():
        metric, _, filt = key.partition(",")
        if key == "alias" or not filt or metric.endswith("_stderr"):
            continue
        label = metric if filt == "none" and metric not in RESERVED else f"{metric},{filt}"
        out[label] = _number(value)
        stderr_label = f"{metric}_stderr" + ("" if label == metric else f",{filt}")
        out[stderr_label] = _number(row.get(f"{metric}_stderr,{filt}"))
    n = results.get("n-samples", {}).get(name, {})
    out["n"] = int(n.get("effective", n.get("original", 0)))
    shots = results.get("n-shot", {}).get(name, num_fewshot)
    out["num_fewshot"] = int(shots) if isinstance(shots, int) else num_fewshot
    return out


def run_lm_eval(model, tokenizer, tasks: Sequence[str | LmEvalTask] = STANDARD_TASKS,
                local_tasks: dict[str, str | Path] | None = None, limit: int | None = None, batch_size: int = 8,
                num_fewshot: int = 0, hub_timeout: float = 3.0) -> dict[str, dict]:
    """Evaluate a loaded model on lm-eval tasks, skipping those whose data is not reachable.

    Args:
        model: a loaded ``transformers`` causal LM (eval mode, any device).
        tokenizer: its tokenizer.
        tasks: lm-eval tasks: :class:`LmEvalTask`\\ s or specs for :func:`parse_task_spec` (task names or
            task YAML files, ``@num_fewshot=K,limit=N`` optional); ``STANDARD_TASKS`` by default.
        local_tasks: extra ``{name: jsonl_path}`` tasks in :func:`orchestrator.evaluation.zeroshot.load_task`'s format.
        limit: evaluate only the first ``limit`` examples of each task without a limit of its own.
        batch_size: lm-eval's batch size.
        num_fewshot: in-context examples per prompt of each task without its own (0: zero-shot).
        hub_timeout: seconds for the one reachability probe of the hub.

    Returns:
        ``{task: result}`` per leaf task: :func:`summarize`'s metrics, ``n`` and ``num_fewshot``, or for a
        task whose data could not be fetched ``{"status": "skipped", "reason": "skipped: <task>: data not
        reachable (...)"}``.

    Raises:
        UsageError: lm-eval is not installed, a spec is malformed, a task name is unknown to lm-eval, or a
            task file is missing or names no task.
    """
    _require_lm_eval()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    specs = [(t if isinstance(t, LmEvalTask) else parse_task_spec(t)).resolved(num_fewshot, limit) for t in tasks]
    names = [s.name for s in specs if not s.is_file]
    manager = _task_manager(names)
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        raise UsageError(f"lm-eval tasks: unknown task(s) {', '.join(unknown)} (see `lm-eval ls tasks`)")
    jobs: list[tuple[str, str | dict, object, LmEvalTask]] = []  # (name, what manager.load gets, manager, settings)
    for s in specs:
        if not s.is_file:
            jobs.append((s.name, s.name, manager, s))
            continue
        jobs.append((yaml_task_name(s.name), s.name, _file_manager(Path(s.name)), s))  # loaded by its path
    jobs += [(name, local_task_config(name, path), manager, LmEvalTask(name, num_fewshot, limit))
             for name, path in (local_tasks or {}).items()]
    offline = bool(specs) and not hub_reachable(hub_timeout)
    if offline:
        log.warning("the Hugging Face hub is not reachable: lm-eval tasks use cached data only")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal")
    out: dict[str, dict] = {}
    for name, spec, mgr, s in jobs:
        with hub_offline(offline):
            try:
                loaded = mgr.load([spec])["tasks"]  # downloads (or reads the cache of) the task's data
            except Exception as exc:  # noqa: BLE001 - classified below; anything else is a real error
                reason = _unreachable(exc)
                if reason is None:
                    raise
                out[name] = {"status": "skipped", "reason": f"skipped: {name}: data not reachable ({reason})"}
                log.warning("%s", out[name]["reason"])
                continue
            res = simple_evaluate(model=lm, tasks=list(loaded.values()), num_fewshot=s.num_fewshot, limit=s.limit,
                                  task_manager=mgr, log_samples=False, verbosity="WARNING")
        for leaf in loaded:
            key = leaf if leaf not in out else f"{leaf}@{s.options()}"  # one task, other settings
            out[key] = summarize(res, leaf, s.num_fewshot)
            log.info("lm-eval %s: %s", key, {k: v for k, v in out[key].items() if k != "status"})
    return out
