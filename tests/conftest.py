"""Shared fixtures: where the real benchmark files are, and whether a Docker engine is usable.

Outside CI a missing resource skips with a reason; with ``CI=true`` it fails, so CI can never go
green by skipping the tests that matter.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for a hub

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SHARED_BENCHMARKS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "benchmarks"


def require(condition: bool, reason: str) -> None:
    """Skip (locally) or fail (in CI) when a test's real resource is missing."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def benchmarks_dir() -> Path:
    """The real benchmark files in ../shared/data/benchmarks (never copied into the project)."""
    path = Path(os.environ.get("TIR_SHARED_BENCHMARKS", SHARED_BENCHMARKS))
    require(path.is_dir(), f"benchmark files not found at {path} (expected ../shared beside the repo)")
    return path


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny test models run fastest on one thread, and several threads thrash a 2-core box."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def sample_benchmarks_dir(tmp_path_factory) -> Path:
    """A ``TIR_DATA_DIR`` holding a few real records of each benchmark added beyond the shared five,
    in the Qwen2.5-Math evaluation suite's layout (``<name>/test.jsonl``)."""
    import json

    from tests.real_records import REAL_RECORDS

    root = tmp_path_factory.mktemp("benchmarks")
    for name, records in REAL_RECORDS.items():
        (root / name).mkdir()
        lines = "".join(json.dumps(record) + "\n" for record in records)
        (root / name / "test.jsonl").write_text(lines, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def host_listener():
    """A TCP port open on the host's loopback: the code must not be able to reach it."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    yield server
    server.close()
