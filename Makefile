# The two quick-start commands: `make run` (set up, then the default job on embedded local Ray, CPU)
# and `make test` (set up, then every test: fast, slow end-to-end, and vLLM-on-CPU in its own venv).
PY := .venv/bin/python
export RAY_AUTH_MODE ?= disabled
export TOKENIZERS_PARALLELISM := false

.PHONY: setup setup-vllm run lint test test-fast test-slow test-vllm bench clean

setup:
	bash scripts/setup.sh

setup-vllm:
	bash scripts/setup_vllm.sh

# The demo replaces its own previous run in runs/tiny, so it runs any number of times; a plain `rlhf-dist train`
# refuses an output_dir holding another run's results (rlhf_dist/run_dir.py).
run: setup
	.venv/bin/rlhf-dist train configs/tiny_cpu.yaml checkpoint.overwrite=true

lint: setup
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not vllm"

test-slow: setup
	$(PY) -m pytest -q -m "slow and not vllm"

test-vllm: setup-vllm
	.venv-vllm/bin/python -m pytest -q -m vllm

# --durations: CI's log names the slowest tests, where the suite's time goes
test: setup setup-vllm lint
	$(PY) -m pytest -q -m "not vllm" --durations=25
	.venv-vllm/bin/python -m pytest -q -m vllm

bench: setup
	$(PY) benchmarks/throughput.py

clean:
	rm -rf .venv .venv-vllm runs

# The GPU check (benchmarks/gpu_check.py). On the one-GPU device there is no .venv: python3 with the ray/deepspeed
# wheels that `bash ../shared/tools/device-pack.sh` packed into .device/. Here and in CI: `make gpu-check ARGS=--dry-run`
# with .venv's python (the packed cp312 wheels must not shadow .venv's packages, so .device is used only without it).
.PHONY: gpu-check
gpu-check: SHELL := /bin/bash
gpu-check:
	@if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; \
	  if [ -f .device/install.sh ]; then source .device/install.sh || exit 1; fi; fi; \
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $$py benchmarks/gpu_check.py $(ARGS)
