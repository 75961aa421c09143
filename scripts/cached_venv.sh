# Sourced by the scripts that build a venv cached outside the clone (verl_venv.sh, vllm_venv.sh).
# `open_cached_venv DIR STAMP` prints DIR's python and exits when DIR was built with STAMP;
# otherwise it makes DIR a fresh venv with CPU torch, installed first so that nothing later can
# resolve a CUDA build. `close_cached_venv DIR STAMP` checks that pin held, stamps DIR and prints
# its python.
open_cached_venv() {
    local venv=$1 stamp=$2
    if [[ -f "$venv/.stamp" && "$(cat "$venv/.stamp")" == "$stamp" ]]; then
        echo "$venv/bin/python"
        exit 0
    fi
    rm -rf "$venv"
    mkdir -p "$(dirname "$venv")"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip >&2
    "$venv/bin/pip" install -q torch==2.13.0 >&2
}

close_cached_venv() {
    local venv=$1 stamp=$2
    # A CUDA build would mean the CPU pin was lost: fail loudly rather than test the wrong thing.
    "$venv/bin/python" -c "import torch, sys; sys.exit(torch.version.cuda is not None)" \
        || { echo "$venv: torch is a CUDA build" >&2; exit 1; }
    echo "$stamp" > "$venv/.stamp"
    echo "$venv/bin/python"
}
