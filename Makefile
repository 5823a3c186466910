# rayprune: set-up, main job, tests. `make run` and `make test` each create the
# virtual environment on first use (torch's CPU build first, then the project), at the versions of
# constraints.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rayprune-installed
PYTEST_ARGS ?=

.PHONY: setup run test test-unit lint bench-quality bench-distributed peer-venv peer-structured gpu-bundle clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,eval]'
	@# DeepSpeed's CPU shared-memory all-reduce op, compiled now rather than in the first run's prune phase (~30 s)
	DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load(verbose=False)" \
		>/dev/null 2>&1 || echo "warning: DeepSpeed's CPU op did not build now; the first CPU run builds it"
	touch $(STAMP)

## The main job: prune SmolLM2-135M with GBLM on a local Ray with two workers, evaluate, write runs/default.
run: setup
	$(VENV)/bin/rayprune prune configs/default.yaml output.overwrite=true

## The test suite (unit + local Ray integration; GPU tests skip without a GPU).
test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

test-unit: setup
	$(PY) -m pytest -q tests/unit

lint: setup
	$(VENV)/bin/ruff check .

bench-quality: setup
	$(PY) tests/benchmarks/quality.py --out bench-out/quality.json

## llm-compressor for the quality benchmark's peer rows: its own venv (it pins an older transformers).
peer-venv: .venv-peer/.installed

.venv-peer/.installed:
	test -x .venv-peer/bin/python || $(PYTHON) -m venv .venv-peer
	.venv-peer/bin/python -m pip install -q torch==2.13.0
	.venv-peer/bin/python -m pip install -q "llmcompressor==0.14.0.1" pyarrow
	touch $@

## Torch-Pruning for the structured benchmark's peer rows (the `peer` extra, in the project's venv).
peer-structured: setup
	$(PY) -m pip install -q -c constraints.txt -e '.[peer]'

bench-distributed: setup
	$(PY) tests/benchmarks/distributed.py --out bench-out/distributed.json

## The wheels the GPU machine's image lacks, in the git-ignored .whl/ (send it with run(carry=[".whl"])): Ray core
## trimmed, DeepSpeed without prebuilt ops, their missing dependencies and gguf, for CPython 3.12 manylinux x86_64.
## Needs the network, binutils' strip and the venv's torch (DeepSpeed's build imports it); about 30 s. It also
## rewrites tests/gpu/bundle-lock.json, which CI checks offline: commit it with the pin change that needed it.
gpu-bundle: .whl/MANIFEST.json
	$(PY) tests/gpu/bundle.py check --dir .whl

.whl/MANIFEST.json: constraints.txt tests/gpu/bundle.py | $(STAMP)
	$(PY) tests/gpu/bundle.py build --out .whl

clean:
	rm -rf bench-out .pytest_cache
