#!/usr/bin/env bash
# A venv for the verl adapter's tests, cached outside the clone: verl 0.9 pins transformers<5.11,
# which the project venv (transformers 5.2x) cannot hold. CPU torch goes in first, so nothing can
# resolve a CUDA build; then our dependencies with the [verl] extra. The project itself is not
# installed there: tests put the checkout on PYTHONPATH, so the venv outlives any one clone.
# Rebuilt when pyproject.toml or this script changes. Prints the venv's python.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv=${1:-${TIR_VERL_VENV:-$HOME/.cache/tir-gym/verl-venv}}
stamp=$(cat "$here/pyproject.toml" "$0" | sha256sum | cut -c1-16)
if [[ -f "$venv/.stamp" && "$(cat "$venv/.stamp")" == "$stamp" ]]; then
    echo "$venv/bin/python"
    exit 0
fi
rm -rf "$venv"
mkdir -p "$(dirname "$venv")"
python3 -m venv "$venv"
pip="$venv/bin/pip"
"$pip" install -q --upgrade pip >&2
"$pip" install -q torch==2.13.0 >&2
"$pip" install -q "$here[verl,test]" >&2
"$pip" uninstall -q -y tir-gym >&2
# A CUDA build would mean the CPU pin above was lost: fail loudly rather than test the wrong thing.
"$venv/bin/python" -c "import torch, sys; sys.exit(torch.version.cuda is not None)" \
    || { echo "verl venv: torch is a CUDA build" >&2; exit 1; }
echo "$stamp" > "$venv/.stamp"
echo "$venv/bin/python"
