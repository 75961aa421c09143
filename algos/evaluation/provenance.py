"""Where and when a number was made: the machine, package versions, the commit and the load.

Every committed result carries this record, so a reader can tell a quiet-machine timing from one
taken while other jobs shared the cores, and find the code that produced it.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SESSIONS_FILE = "sessions.jsonl"


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def cpu_model() -> str:
    """The CPU's marketing name from ``/proc/cpuinfo`` (``platform`` only knows the arch)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(root: Path = ROOT) -> str | None:
    """The short commit hash, with ``+dirty`` when tracked files differ from it (None outside a
    git checkout)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def package_versions(names: tuple[str, ...] = ("torch", "transformers", "gymnasium")
                     ) -> dict[str, str]:
    """Installed versions of ``names`` ("absent" for one that is not installed)."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def machine_info(packages: tuple[str, ...] = ("torch", "transformers", "gymnasium")
                 ) -> dict[str, Any]:
    """The provenance record: date, CPU, cores, torch threads (when torch is loaded), platform,
    Python and package versions, commit, and the 1/5/15-minute load average now."""
    info: dict[str, Any] = {
        "date": now(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        **package_versions(packages),
        "commit": git_commit(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
    return info


class LoadSampler:
    """The 1-minute load average, sampled every ``every_s`` seconds by a daemon thread while the
    ``with`` block runs: an hours-long benchmark says how busy the machine was throughout, not
    only at its two ends."""

    def __init__(self, every_s: float = 30.0):
        self.samples: list[float] = []
        self._every_s = every_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stopped.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    def _sample(self) -> None:
        while True:
            self.samples.append(os.getloadavg()[0])
            if self._stopped.wait(self._every_s):
                return

    def summary(self) -> dict[str, float]:
        """First, mean, max and last sample, rounded to 0.01."""
        values = self.samples or [os.getloadavg()[0]]
        return {"start": round(values[0], 2), "mean": round(sum(values) / len(values), 2),
                "max": round(max(values), 2), "end": round(values[-1], 2),
                "samples": len(values)}


def append_sessions(out_dir: Path, sessions: list[dict]) -> None:
    """Append invocation records to ``out_dir/sessions.jsonl``: a resumable benchmark's results
    then say when, where and at what cost each part of them was made."""
    with (out_dir / SESSIONS_FILE).open("a", encoding="utf-8") as f:
        f.writelines(json.dumps(s) + "\n" for s in sessions)


def read_sessions(out_dir: Path) -> list[dict]:
    """The records ``append_sessions`` wrote, oldest first ([] when there are none)."""
    path = out_dir / SESSIONS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_benchmark(out: Path, name: str, report: dict, markdown: str) -> None:
    """A benchmark's committed pair: ``<name>.json`` (every measurement) and ``<name>.md``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / f"{name}.md").write_text(markdown)
