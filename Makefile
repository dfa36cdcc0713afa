# The two quick-start commands: `make run` (set up, then the default job on embedded local Ray, CPU)
# and `make test` (set up, then every test: fast, slow end-to-end, and vLLM-on-CPU in its own venv).
PY := .venv/bin/python
export RAY_AUTH_MODE ?= disabled
export TOKENIZERS_PARALLELISM := false

.PHONY: setup setup-vllm run test test-fast test-slow test-vllm bench clean

setup:
	bash scripts/setup.sh

setup-vllm:
	bash scripts/setup_vllm.sh

run: setup
	.venv/bin/rlhf-dist train configs/tiny_cpu.yaml

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not vllm"

test-slow: setup
	$(PY) -m pytest -q -m "slow and not vllm"

test-vllm: setup-vllm
	.venv-vllm/bin/python -m pytest -q -m vllm

test: setup setup-vllm
	$(PY) -m pytest -q -m "not vllm"
	.venv-vllm/bin/python -m pytest -q -m vllm

bench: setup
	$(PY) benchmarks/throughput.py

clean:
	rm -rf .venv .venv-vllm runs
