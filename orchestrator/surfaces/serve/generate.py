"""Text generation from a pruned checkpoint, to smoke-test what the compression service produced.

``POST /v1/generate`` with ``{"prompt": "...", "max_new_tokens": 32}`` and
``Authorization: Bearer <token>`` -> ``{"text": <the generated continuation>, "tokens": <how many
tokens were generated>}``. Decoding is greedy, so the answer is deterministic.

Import path for ``serve run`` or a RayService serve config: ``orchestrator.surfaces.serve.generate:build_app``
with the args of :class:`~orchestrator.surfaces.serve.options.GenerateOptions`, e.g.::

    RAYPRUNE_SERVE_TOKEN=... serve run orchestrator.surfaces.serve.generate:build_app model_dir=/data/runs/JOB
"""


import asyncio
import logging
import threading
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from ray import serve

from orchestrator.errors import ConfigError, UsageError
from orchestrator.inputs.config import DTYPES, ModelConfig
from orchestrator.inputs.models import load_tokenizer
from orchestrator.structured.shrink import load_checkpoint
from orchestrator.surfaces.serve.auth import ApiError, BearerAuth, install_error_handlers, load_token
from orchestrator.surfaces.serve.bodies import check_plain, decode_json, read_body
from orchestrator.surfaces.serve.options import GenerateOptions, parse_options

log = logging.getLogger(__name__)

api = FastAPI(title="rayprune generation", docs_url=None, redoc_url=None, openapi_url=None)
install_error_handlers(api)


def checkpoint_dir(model_dir: str) -> Path:
    """The checkpoint to load: ``model_dir`` itself, or ``model_dir/model`` for a run directory.

    Raises:
        UsageError: neither holds a ``config.json``.
    """
    path = Path(model_dir).expanduser()
    for candidate in (path / "model", path):
        if (candidate / "config.json").is_file():
            return candidate
    raise UsageError(f"model_dir: {model_dir!r} is neither a checkpoint nor a run directory (no config.json)")


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=16)
@serve.ingress(api)
class Generator:
    """Greedy generation with one loaded checkpoint.

    Args:
        model_dir: checkpoint or run directory.
        token_file: file holding the bearer token, else the environment variables.
        dtype: weights dtype.
        max_new_tokens_limit: the most tokens one request may ask for.
        max_body_bytes: largest accepted request body.
    """

    def __init__(self, model_dir: str, token_file: str | None = None, dtype: str = "float32",
                 max_new_tokens_limit: int = 256, max_body_bytes: int = 64 << 10):
        self._auth = BearerAuth(load_token(token_file))
        path = str(checkpoint_dir(model_dir))
        mcfg = ModelConfig(source=path, dtype=dtype)
        self.tokenizer = load_tokenizer(path, mcfg)
        self.model = load_checkpoint(path, mcfg)
        self.limit = max_new_tokens_limit
        self.max_body = max_body_bytes
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None)
        self._lock = threading.Lock()  # one generation at a time per replica
        log.info("generator ready: %s (%s)", path, type(self.model).__name__)

    def _generate(self, prompt: str, max_new_tokens: int) -> dict:
        ids = self.tokenizer(prompt, return_tensors="pt")
        n_prompt = int(ids["input_ids"].shape[1])
        if n_prompt == 0:
            raise ApiError(400, "prompt: encodes to no tokens")
        if self.max_positions is not None and n_prompt + max_new_tokens > self.max_positions:
            raise ApiError(400, f"max_new_tokens: prompt ({n_prompt} tokens) plus {max_new_tokens} exceeds the "
                                f"model's {self.max_positions} positions")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with self._lock, torch.no_grad():
            out = self.model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        new = out[0, n_prompt:]
        return {"text": self.tokenizer.decode(new, skip_special_tokens=True), "tokens": int(new.numel())}

    @api.post("/v1/generate")
    async def generate(self, request: Request) -> dict:
        """Continue ``prompt`` by up to ``max_new_tokens`` tokens."""
        self._auth.check(request)
        raw = await read_body(request, self.max_body)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, "body: expected a JSON object with prompt and max_new_tokens") from None
        body = decode_json(text, "body")
        if not isinstance(body, dict):
            raise ApiError(400, f"body: expected a JSON object, got {type(body).__name__}")
        unknown = sorted(set(body) - {"prompt", "max_new_tokens"})
        if unknown:
            raise ApiError(400, f"{str(unknown[0])[:40]}: unknown key (allowed: max_new_tokens, prompt)")
        check_plain(body, "body")
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, f"prompt: expected a non-empty string, got {prompt!r}"[:200])
        n = body.get("max_new_tokens", 32)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= self.limit:
            raise ApiError(400, f"max_new_tokens: expected an integer in [1, {self.limit}], got {n!r}")
        return await asyncio.to_thread(self._generate, prompt, n)


def build_app(args: dict | None = None) -> serve.Application:
    """The generation app, for ``serve run orchestrator.surfaces.serve.generate:build_app`` or a serve config.

    Args:
        args: :class:`~orchestrator.surfaces.serve.options.GenerateOptions` fields (strings are parsed).

    Raises:
        ConfigError: bad arguments or no ``model_dir``.
        UsageError: no bearer token configured.
    """
    opts = parse_options(GenerateOptions, args)
    if not opts.model_dir:
        raise ConfigError(["model_dir: required (a checkpoint directory or a run directory)"])
    if opts.dtype not in DTYPES:
        raise ConfigError([f"dtype: {opts.dtype!r} is not one of {', '.join(DTYPES)}"])
    load_token(opts.token_file)
    deployment = Generator.options(num_replicas=opts.num_replicas, ray_actor_options={"num_cpus": opts.num_cpus})
    return deployment.bind(model_dir=opts.model_dir, token_file=opts.token_file, dtype=opts.dtype,
                           max_new_tokens_limit=opts.max_new_tokens_limit, max_body_bytes=opts.max_body_bytes)
