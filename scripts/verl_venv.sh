#!/usr/bin/env bash
# A venv for the verl adapter's tests, cached outside the clone: verl 0.9 pins transformers<5.11,
# which the project venv (transformers 5.2x) cannot hold. CPU torch goes in first, so nothing can
# resolve a CUDA build; then our dependencies with the [verl] extra. The project itself is not
# installed there: tests put the checkout on PYTHONPATH, so the venv outlives any one clone.
# Rebuilt when pyproject.toml or these scripts change. Prints the venv's python.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
source "$here/scripts/cached_venv.sh"
venv=${1:-${TIR_VERL_VENV:-$HOME/.cache/tir-gym/verl-venv}}
stamp=$(cat "$here/pyproject.toml" "$0" "$here/scripts/cached_venv.sh" | sha256sum | cut -c1-16)
open_cached_venv "$venv" "$stamp"
"$venv/bin/pip" install -q "$here[verl,test]" >&2
"$venv/bin/pip" uninstall -q -y tir-gym >&2
close_cached_venv "$venv" "$stamp"
