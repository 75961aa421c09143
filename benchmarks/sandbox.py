"""Sandbox latency, throughput, start-up and memory per backend, against a fresh interpreter.

Everything is measured in one run on one machine, so the ratios hold even on a busy host (the
load average at the start is recorded too). Per backend:

1. warm exec latency p50/p99 in one session: a trivial snippet and a numpy + sympy snippet;
2. cold exec: a new session, one run, close (what a one-shot ``sandbox.run`` costs);
3. throughput of the trivial snippet with 1 and 2 sessions driven by concurrent threads;
4. session start cost (``session()`` until its kernel is ready): back to back, and after a pause
   that lets prestarted kernels/containers refill; close cost; for local, the raw cost of
   forking and isolating a kernel when nothing is prestarted;
5. memory: the warm zygote, and what each extra kernel adds (local backend).

Baseline: ``python -c <snippet>`` with this interpreter, a fresh process per snippet (what tools
that start an interpreter per call pay).

Usage: ``python benchmarks/sandbox.py [--backends local docker] [--quick]``.
Writes ``benchmarks/results/sandbox.json`` and ``sandbox.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from algos.evaluation.provenance import machine_info
from tir_envs.sandbox import make_sandbox

log = logging.getLogger("benchmarks.sandbox")
ROOT = Path(__file__).resolve().parents[1]
TRIVIAL = "print(sum(range(10)))"
NUMERIC = """\
import numpy as np
import sympy as sp
x = sp.Symbol('x')
roots = sp.solve(x**2 - 5*x + 6, x)
A = np.array([[2.0, 1.0], [1.0, 3.0]])
print(roots, np.linalg.solve(A, np.array([3.0, 5.0])).round(3))
"""
TARGETS = {"local_speedup_min": 25.0, "local_execs_per_s_min": 500.0, "docker_p50_ms_max": 100.0}


def percentiles(samples_s: list[float]) -> dict:
    ordered = sorted(samples_s)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3

    return {"p50_ms": round(statistics.median(ordered) * 1e3, 4), "p99_ms": round(at(0.99), 4),
            "mean_ms": round(statistics.fmean(ordered) * 1e3, 4), "n": len(ordered)}


def timed(fn, repeats: int) -> list[float]:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def fresh_interpreter(code: str, repeats: int) -> dict:
    def once() -> None:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              cwd="/tmp", check=False)
        if done.returncode != 0:
            raise RuntimeError(done.stderr)

    once()  # page cache warm, like the sandbox's zygote
    return percentiles(timed(once, repeats))


def checked_run(session, code: str) -> None:
    result = session.run(code)
    if not result.ok:
        raise RuntimeError(f"benchmark snippet failed: {result}")


def throughput(sandbox, n_sessions: int, seconds: float) -> float:
    sessions = [sandbox.session() for _ in range(n_sessions)]
    for s in sessions:
        checked_run(s, TRIVIAL)
    counts = [0] * n_sessions
    stop = time.perf_counter() + seconds

    def drive(index: int) -> None:
        while time.perf_counter() < stop:
            checked_run(sessions[index], TRIVIAL)
            counts[index] += 1

    threads = [threading.Thread(target=drive, args=(i,)) for i in range(n_sessions)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    for s in sessions:
        s.close()
    return round(sum(counts) / elapsed, 1)


def session_cycle(sandbox, repeats: int, pause_s: float) -> tuple[dict, dict]:
    """Time ``session()`` and ``close()``; a pause between cycles lets a backend that keeps
    kernels (or containers) ready refill, as it would between episodes."""
    starts, closes = [], []
    for _ in range(repeats):
        time.sleep(pause_s)
        t0 = time.perf_counter()
        fresh = sandbox.session()
        t1 = time.perf_counter()
        fresh.close()
        starts.append(t1 - t0)
        closes.append(time.perf_counter() - t1)
    return percentiles(starts), percentiles(closes)


def kernel_spawn(repeats: int) -> dict:
    """The local backend's raw cost of forking and isolating a kernel (nothing prestarted)."""
    with make_sandbox("local", prestart=0) as sandbox:
        starts, _ = session_cycle(sandbox, repeats, pause_s=0.0)
    return starts


def kib(value: int) -> int:
    return value // 1024


def local_memory(sandbox) -> dict:
    """Zygote RSS/PSS, and the unique (USS) + proportional (PSS) memory of one kernel process
    and its supervisor after a numpy/sympy run: what each extra session really adds."""
    zygote = psutil.Process(sandbox.zygote_pid).memory_full_info()
    with sandbox.session() as s:
        checked_run(s, NUMERIC)
        kernel = psutil.Process(s.kernel_pid)
        supervisor = kernel.parent()
        k, a = kernel.memory_full_info(), supervisor.memory_full_info()
        return {
            "zygote_rss_kib": kib(zygote.rss), "zygote_pss_kib": kib(zygote.pss),
            "kernel_uss_kib": kib(k.uss), "kernel_pss_kib": kib(k.pss),
            "supervisor_uss_kib": kib(a.uss),
            "per_session_uss_kib": kib(k.uss + a.uss),
        }


def docker_memory(sandbox) -> dict:
    """Unique memory (USS) of every process of one pool container, seen from the host, idle and
    while a session holds it after a numpy/sympy run; plus the dockerd + containerd overhead."""
    from tir_envs.sandbox import docker as docker_backend

    client = docker_backend._connect()
    label = f"{docker_backend.POOL_LABEL}={sandbox.pool_id}"

    def container_uss() -> list[int]:
        sizes = []
        for container in client.containers.list(filters={"label": label}):
            init = psutil.Process(container.attrs["State"]["Pid"])
            processes = [init, *init.children(recursive=True)]
            sizes.append(kib(sum(p.memory_full_info().uss for p in processes)))
        return sizes

    try:
        idle = container_uss()
        with sandbox.session() as s:
            checked_run(s, NUMERIC)
            busy = container_uss()
    finally:
        client.close()
    return {"container_uss_idle_kib": idle, "container_uss_with_session_kib": busy}


def bench_backend(name: str, quick: bool) -> dict:
    scale = 0.2 if quick else 1.0

    def n(count: int) -> int:
        return max(5, int(count * scale))

    started = time.perf_counter()
    sandbox = make_sandbox(name)
    result: dict = {"sandbox_start_s": round(time.perf_counter() - started, 3),
                    "isolation": sandbox.isolation.layers,
                    "missing_layers": sandbox.isolation.missing}
    try:
        with sandbox.session() as s:
            for _ in range(20):
                checked_run(s, TRIVIAL)
            result["warm_trivial"] = percentiles(timed(lambda: checked_run(s, TRIVIAL), n(3000)))
            checked_run(s, NUMERIC)
            result["warm_numeric"] = percentiles(timed(lambda: checked_run(s, NUMERIC), n(300)))

        def cold() -> None:
            with sandbox.session() as fresh:
                checked_run(fresh, TRIVIAL)

        result["cold_trivial"] = percentiles(timed(cold, n(60)))
        result["session_start_back_to_back"], result["session_close"] = session_cycle(
            sandbox, n(60), pause_s=0.0)
        result["session_start_after_pause"], _ = session_cycle(sandbox, n(25), pause_s=0.3)
        seconds = 1.0 if quick else 3.0
        result["throughput_execs_per_s"] = {
            "1_session": throughput(sandbox, 1, seconds),
            "2_sessions": throughput(sandbox, 2, seconds),
        }
        result["memory"] = local_memory(sandbox) if name == "local" else docker_memory(sandbox)
    finally:
        sandbox.close()
    if name == "local":
        result["kernel_spawn_without_prestart"] = kernel_spawn(n(60))
    return result


def docker_available() -> str | None:
    try:
        from tir_envs.sandbox import docker as docker_backend
    except ImportError as exc:
        return f"docker backend not importable: {exc}"
    return docker_backend.unavailable_reason()


def render_markdown(report: dict) -> str:
    m, base = report["machine"], report["baseline_fresh_python"]
    lines = [
        "# Sandbox benchmark",
        "",
        (f"{m['date']} · {m['cpu']} · {m['cpus']} cores · {m['memory_gib']} GiB · "
        f"{m['platform']} · Python {m['python']} · commit {m['commit']} · load average at start "
        f"{', '.join(map(str, m['load_average']))}"),
        "",
        ("Trivial snippet: `print(sum(range(10)))`. Numeric snippet: numpy + sympy (solve a "
        "quadratic, a 2x2 linear system). Baseline: a fresh `python -c` per snippet, same "
        "interpreter, same run."),
        "",
        "| | trivial p50 | trivial p99 | numeric p50 | numeric p99 |",
        "|---|---|---|---|---|",
        (f"| fresh `python -c` | {base['trivial']['p50_ms']:.2f} ms | {base['trivial']['p99_ms']:.2f} ms"
        f" | {base['numeric']['p50_ms']:.1f} ms | {base['numeric']['p99_ms']:.1f} ms |"),
    ]
    for name, r in report["backends"].items():
        if "skipped" in r:
            continue
        lines.append(
            f"| {name}, warm session | {r['warm_trivial']['p50_ms']:.3f} ms | "
            f"{r['warm_trivial']['p99_ms']:.3f} ms | {r['warm_numeric']['p50_ms']:.2f} ms | "
            f"{r['warm_numeric']['p99_ms']:.2f} ms |")
        lines.append(
            f"| {name}, new session per snippet | {r['cold_trivial']['p50_ms']:.2f} ms | "
            f"{r['cold_trivial']['p99_ms']:.2f} ms | | |")
    lines += ["", ("| backend | speedup vs fresh python (trivial / numeric p50) | execs/s, 1 session"
              " | execs/s, 2 sessions | session start p50 / p99, after a pause | session start "
              "p50 / p99, back to back | session close p50 | sandbox start |"),
              "|---|---|---|---|---|---|---|---|"]
    for name, r in report["backends"].items():
        if "skipped" in r:
            lines.append(f"| {name} | skipped: {r['skipped']} | | | | | | |")
            continue
        s, t = r["speedup_p50"], r["throughput_execs_per_s"]
        paused, churn = r["session_start_after_pause"], r["session_start_back_to_back"]
        lines.append(
            f"| {name} | {s['trivial']:.0f}x / {s['numeric']:.0f}x | {t['1_session']:.0f} | "
            f"{t['2_sessions']:.0f} | {paused['p50_ms']:.2f} / {paused['p99_ms']:.1f} ms | "
            f"{churn['p50_ms']:.1f} / {churn['p99_ms']:.1f} ms | "
            f"{r['session_close']['p50_ms']:.1f} ms | {r['sandbox_start_s']:.2f} s |")
    local = report["backends"].get("local", {})
    if "kernel_spawn_without_prestart" in local:
        spawn = local["kernel_spawn_without_prestart"]
        lines += ["", (f"Local kernel spawn with nothing prestarted (fork from the zygote, "
                      f"namespaces, filesystem view, cgroups, until ready): p50 "
                      f"{spawn['p50_ms']:.1f} ms, p99 {spawn['p99_ms']:.1f} ms.")]
    lines += ["", "Memory:", ""]
    for name, r in report["backends"].items():
        if "memory" in r:
            lines.append(f"- {name}: " + ", ".join(f"{k} = {v}" for k, v in r["memory"].items()))
    lines += ["", "Targets:", ""]
    for check in report["targets"]:
        lines.append(f"- {'PASS' if check['pass'] else 'FAIL'}: {check['what']} "
                     f"(measured {check['measured']})")
    for name, r in report["backends"].items():
        if r.get("missing_layers"):
            lines.append(f"\n{name}: isolation layers missing here: {', '.join(r['missing_layers'])}")
    return "\n".join(lines) + "\n"


def evaluate_targets(report: dict) -> list[dict]:
    checks = []
    local = report["backends"].get("local", {})
    if "speedup_p50" in local:
        checks.append({"what": "local warm exec p50 >= 25x faster than a fresh python -c",
                       "measured": f"{local['speedup_p50']['trivial']:.0f}x",
                       "pass": local["speedup_p50"]["trivial"] >= TARGETS["local_speedup_min"]})
        rate = local["throughput_execs_per_s"]["1_session"]
        checks.append({"what": "local >= 500 execs/s (one session)", "measured": f"{rate:.0f}/s",
                       "pass": rate >= TARGETS["local_execs_per_s_min"]})
    docker = report["backends"].get("docker", {})
    if "warm_trivial" in docker:
        p50 = docker["warm_trivial"]["p50_ms"]
        checks.append({"what": "docker warm exec p50 <= 100 ms", "measured": f"{p50:.2f} ms",
                       "pass": p50 <= TARGETS["docker_p50_ms_max"]})
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["local", "docker"],
                        choices=["local", "docker"])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (smoke run)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    memory_gib = round(psutil.virtual_memory().total / 2**30, 1)
    report = {"machine": {**machine_info(()), "memory_gib": memory_gib},
              "snippets": {"trivial": TRIVIAL, "numeric": NUMERIC}}
    log.info("baseline: fresh interpreter per snippet")
    repeats = 10 if args.quick else 40
    report["baseline_fresh_python"] = {
        "trivial": fresh_interpreter(TRIVIAL, repeats),
        "numeric": fresh_interpreter(NUMERIC, max(5, repeats // 4)),
    }
    report["backends"] = {}
    for name in args.backends:
        reason = docker_available() if name == "docker" else None
        if reason is not None:
            log.warning("skipping %s: %s", name, reason)
            report["backends"][name] = {"skipped": reason}
            continue
        log.info("benchmarking the %s backend", name)
        result = bench_backend(name, args.quick)
        base = report["baseline_fresh_python"]
        result["speedup_p50"] = {
            kind: round(base[kind]["p50_ms"] / result[f"warm_{kind}"]["p50_ms"], 1)
            for kind in ("trivial", "numeric")}
        report["backends"][name] = result
    report["targets"] = evaluate_targets(report)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "sandbox.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = render_markdown(report)
    (args.out_dir / "sandbox.md").write_text(markdown)
    sys.stdout.write(markdown)


if __name__ == "__main__":
    main()
