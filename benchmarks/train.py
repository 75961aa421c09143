"""Training throughput: rollout and update tokens/s, seconds per phase and peak memory per algorithm.

For each model (a tiny Llama from ``algos/tiny.py`` and the default SmolLM2-135M-Instruct) and each
algorithm (gtpo, grpo, ppo), one fresh subprocess builds the agent through ``algos.make`` on
TIR-Math-v0 with the real local sandbox, runs one warm-up iteration and then a few measured
iterations of ``Agent.train_iteration`` at one fixed shape (4 prompts x 4 samples, 128 new tokens
per turn, 2 turns, the main job's micro-batching, 1 update epoch, 1 torch thread), and reports
medians. The default model gets a short warm-up (16 new tokens a turn) and fewer measured
iterations, to keep the whole run near 15 minutes on 2 shared cores. A subprocess per
configuration keeps each one's peak memory its own: the trainer process's RSS high-water mark
(``ru_maxrss``), the whole process tree's sampled peak (trainer + sandbox zygote + kernels), and
the parent's ``os.wait4`` view of the child.

The rollout phase is split without touching the agent: the generator and the vector env's
``step``/``reset`` are timed by thin wrappers, so rollout = generation + env steps + the rest
(tokenizing tool output, bookkeeping). Generation is also reported as decode-slot utilisation:
a batched ``generate`` runs until its longest row stops, so rows that stopped early (at the closing
code fence or eos) still occupy their slot.

Baselines, interleaved with the training iterations in the same process (the machine is shared and
noisy, so a ratio between runs seconds apart is more telling than either absolute number):
- plain ``model.generate`` on the same first-turn prompts (same sampling: temperature 1, top-k off,
  max_new_tokens), no logprob recorder, no stop strings, no env;
- our ``hf`` generator on the same prompts, same seed, no stop string: it decodes the same tokens
  as plain ``generate`` until a row ends at eos (``same_tokens_as_plain`` records whether they
  stayed the same: from then on ours draws for the live rows only, and computes only them).

The agent leaves rows whose advantages are all 0 out of the update when nothing else reads them;
on an untrained model that is every GTPO/GRPO row, leaving no update to time. So the run sets
``skip_flat_rows=False`` (the agent updates every row; the gradient is the same) and records how
many rows the default config would have trained on (``--skip-flat-rows`` keeps the default).

A last probe times one tiny forward + backward with 1 and 2 torch threads: on this shared machine
two OpenMP threads on two cores can be many times slower than one, hence ``--threads 1``.

Usage: ``python benchmarks/train.py [--quick] [--models tiny default] [--algos gtpo grpo ppo]``.
Writes ``benchmarks/results/train.json`` and ``train.md`` (``--quick``: a temp dir unless ``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import gymnasium  # noqa: E402

from algos.evaluation.provenance import git_commit, machine_info  # noqa: E402
from algos.evaluation.report import md_table  # noqa: E402

logger = logging.getLogger("benchmarks.train")

ALGOS = ("gtpo", "grpo", "ppo")
MODELS = ("tiny", "default")

# The shape every configuration runs at (PPO too, so tokens/s compare; its default would be 64 x 1).
SHAPE = {
    "prompts_per_iteration": 4,
    "group_size": 4,
    "minibatch_size": 8,  # the main job's micro-batching (algos/cli.py MAIN_JOB)
    "grad_accum_steps": 4,
    "update_epochs": 1,  # PPO's default is 2; one epoch everywhere keeps update seconds comparable
}
ROLLOUT = {"max_new_tokens": 128, "max_turns": 2, "max_total_tokens": 1024, "temperature": 1.0}
# Tiny: lr large enough that the policy moves a little between iterations, as a real run would.
LR = {"tiny": 1e-4, "default": 2e-6}


# ---------------------------------------------------------------------------------------- worker


class TimedVectorEnv(gymnasium.vector.VectorWrapper):
    """Seconds spent in the vector env's ``reset`` and ``step`` (the agent runs unchanged)."""

    def __init__(self, env: gymnasium.vector.VectorEnv):
        super().__init__(env)
        self.clear()

    def clear(self) -> None:
        self.step_s = self.reset_s = 0.0
        self.steps = 0

    def reset(self, **kwargs):
        start = time.perf_counter()
        try:
            return self.env.reset(**kwargs)
        finally:
            self.reset_s += time.perf_counter() - start

    def step(self, actions):
        start = time.perf_counter()
        try:
            return self.env.step(actions)
        finally:
            self.step_s += time.perf_counter() - start
            self.steps += 1

    def get_attr(self, name: str):
        return self.env.get_attr(name)


class _TreeMemory:
    """Samples the RSS of this process and all its descendants (sandbox zygote, kernels)."""

    def __init__(self, interval: float = 0.1):
        import psutil

        self._psutil = psutil
        self._proc = psutil.Process()
        self.interval = interval
        self.peak = 0
        self.peak_children = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        psutil = self._psutil
        try:
            own = self._proc.memory_info().rss
        except psutil.Error:
            return
        children = 0
        for child in self._proc.children(recursive=True):
            try:
                children += child.memory_info().rss
            except psutil.Error:
                pass
        self.peak = max(self.peak, own + children)
        self.peak_children = max(self.peak_children, children)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self):
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


def plain_generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, seed: int):
    """``model.generate`` as a user calls it: left-padded batch, sampling, eos only. Returns
    ``(seconds, ids)``, each row's ids up to and including its eos."""
    import torch
    from transformers import GenerationConfig

    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.as_tensor(prompt)
        attention_mask[row, width - len(prompt) :] = 1
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        eos_token_id=eos,
        pad_token_id=pad,
        use_cache=True,
    )
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            started = time.perf_counter()
            out = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, generation_config=config
            )
            seconds = time.perf_counter() - started
    finally:
        model.train(was_training)
    eos_set = set(eos)
    kept = [
        ids[: next((i + 1 for i, t in enumerate(ids) if t in eos_set), len(ids))]
        for ids in out[:, width:].tolist()
    ]
    return seconds, kept


def _gen_record(seconds: float, ids: list[list[int]]) -> dict[str, Any]:
    """One batched generate call: kept tokens, decode steps (its longest row), tokens/s."""
    lengths = [len(x) for x in ids]
    return {
        "seconds": seconds,
        "rows": len(ids),
        "tokens": sum(lengths),
        "steps": max(lengths),
        "tokens_per_s": sum(lengths) / max(seconds, 1e-9),
    }


def _probe_threads(threads: int, repeats: int) -> float:
    """Median seconds of one forward + backward of the tiny model over 2 x 128 tokens."""
    import torch

    from algos.tiny import tiny_model, tiny_tokenizer

    torch.set_num_threads(threads)
    model = tiny_model(0, tiny_tokenizer())
    ids = torch.randint(
        0, model.config.vocab_size, (2, 128), generator=torch.Generator().manual_seed(0)
    )
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        started = time.perf_counter()
        model(input_ids=ids).logits.float().logsumexp(-1).mean().backward()
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def thread_probe(repeats: int = 5) -> dict[str, Any]:
    load = os.getloadavg()[0]
    out = {}
    for n in (1, 2):
        env = {**os.environ, "OMP_NUM_THREADS": str(n)}
        proc = subprocess.run(
            [sys.executable, __file__, "--probe-threads", str(n), "--probe-repeats", str(repeats)],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        out[str(n)] = float(proc.stdout.strip().splitlines()[-1])
        logger.info("thread probe: %d thread(s) %.3f s", n, out[str(n)])
    return {"repeats": repeats, "load": load, "median_s": out}


def _worker(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import torch

    import algos
    from algos.config import GRPOConfig, GTPOConfig, PPOConfig
    from algos.generation.hf import HFGenerator
    from algos.models import DEFAULT_MODEL, load_policy
    from algos.rollout import RolloutConfig, make_vec_env

    torch.set_num_threads(args.threads)
    memory = _TreeMemory().__enter__()  # peak RSS of this process tree from here on
    config_class = {"gtpo": GTPOConfig, "grpo": GRPOConfig, "ppo": PPOConfig}[args.algo]
    started = time.perf_counter()
    if args.model == "tiny":
        from algos.tiny import tiny_model, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        model = tiny_model(0, tokenizer)
        model_name = "tiny Llama (algos/tiny.py)"
    else:
        model, tokenizer = load_policy(DEFAULT_MODEL)
        model_name = DEFAULT_MODEL
    load_s = time.perf_counter() - started
    rss_after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    class TimedGenerator(HFGenerator):
        """Our hf backend, timing each call and remembering the first call's prompts."""

        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.calls: list[dict[str, float]] = []
            self.first_prompts: list[list[int]] | None = None

        def generate(self, prompts, params):
            if self.first_prompts is None:
                self.first_prompts = [list(p) for p in prompts]
            t0 = time.perf_counter()
            out = super().generate(prompts, params)
            lengths = [len(c.token_ids) for c in out]
            self.calls.append(
                {
                    "seconds": time.perf_counter() - t0,
                    "rows": len(prompts),
                    "steps": max(lengths),
                    "tokens": sum(lengths),
                    "stopped": sum(c.finish_reason == "stop" for c in out),
                    "eos": sum(c.finish_reason == "eos" for c in out),
                }
            )
            return out

    generator = TimedGenerator(model, tokenizer)
    # Otherwise rows whose advantages are all 0 are left out of the forward pass, and on an
    # untrained model (every sample of a group scores the same) that is every row: there would be
    # no update to time. How many rows the default config would train on is recorded below.
    extra = {"skip_flat_rows": False} if args.full_update else {}
    config = config_class(seed=0, lr=LR[args.model], **SHAPE, **extra)
    rollout = RolloutConfig(
        **{**ROLLOUT, "max_new_tokens": args.max_new_tokens, "max_turns": args.max_turns}
    )
    vec_env, sandbox = make_vec_env("TIR-Math-v0", config.prompts_per_iteration * config.group_size,
                                    tokenizer, rollout)
    env_time = TimedVectorEnv(vec_env)
    agent = algos.make(
        args.algo,
        model,
        env_time,
        config,
        tokenizer=tokenizer,
        rollout=rollout,
        generator=generator,
    )
    iterations = []
    total = args.warmup + args.iterations
    for it in range(total):
        warmup = it < args.warmup
        # A warm-up may use a shorter turn budget: it exists to pay first-call costs (lazy imports,
        # sandbox zygote, grader workers, allocator), which do not depend on the length.
        agent.rollout = (
            dataclasses.replace(
                rollout, max_new_tokens=args.warmup_new_tokens or rollout.max_new_tokens
            )
            if warmup
            else rollout
        )
        generator.calls.clear()
        generator.first_prompts = None
        env_time.clear()
        metrics = agent.train_iteration()
        calls = list(generator.calls)
        gen_s = sum(c["seconds"] for c in calls)
        record = {
            "warmup": warmup,
            "max_new_tokens": agent.rollout.max_new_tokens,
            "rollout_s": metrics["time/rollout_s"],
            "advantage_s": metrics["time/advantage_s"],
            "update_s": metrics["time/update_s"],
            "generated_tokens": metrics["tokens/generated"],
            "rollout_tokens_per_s": metrics["tokens/rollout_per_s"],
            "update_tokens_per_s": metrics["tokens/update_per_s"],
            "generate_s": gen_s,
            "generate_tokens_per_s": sum(c["tokens"] for c in calls) / max(gen_s, 1e-9),
            "env_step_s": env_time.step_s,
            "env_reset_s": env_time.reset_s,
            "env_steps": env_time.steps,
            "rollout_other_s": metrics["time/rollout_s"]
            - gen_s
            - env_time.step_s
            - env_time.reset_s,
            "turn_calls": calls,
            "slot_utilisation": sum(c["tokens"] for c in calls)
            / max(sum(c["rows"] * c["steps"] for c in calls), 1),
            "update_forward_backward_s": metrics["time/forward_backward_s"],
            "update_optimizer_s": metrics["time/optimizer_s"],
            "update_micro_steps": metrics["update/micro_steps"],
            "update_sequence_tokens": metrics["tokens/forward"],
            "update_padded_tokens": metrics["tokens/forward_padded"],
            "update_loss_tokens": metrics["tokens/updated"],
            "update_rows": metrics["update/rows_forward"],
            "batch_rows": agent.batch_size * config.update_epochs,
            "rows_with_signal": metrics["update/rows_with_signal"],
            # Measured over what the update actually ran on (the agent leaves out rows whose
            # advantages are all 0 when nothing else reads them); None when it ran on nothing.
            "update_processed_tokens_per_s": metrics["tokens/updated"] / metrics["time/update_s"]
            if metrics["update/rows_forward"]
            else None,
            "update_all_tokens_per_s": metrics["tokens/forward"] / metrics["time/update_s"]
            if metrics["update/rows_forward"]
            else None,
            "turns_mean": metrics.get("turns/mean"),
            "tool_call_rate": metrics.get("tool_call_rate"),
            "accuracy": metrics.get("accuracy"),
            "reward_mean": metrics.get("reward/mean"),
        }
        if not warmup:
            # Baselines on the same first-turn prompts, right after the iteration (same load).
            prompts = generator.first_prompts
            seed = 1000 + it
            seconds, plain_ids = plain_generate(
                model, tokenizer, prompts, rollout.max_new_tokens, seed=seed
            )
            record["plain_generate"] = _gen_record(seconds, plain_ids)
            if args.backend_baseline:
                params = dataclasses.replace(agent.sampling_params(seed), stop=())
                t0 = time.perf_counter()
                out = HFGenerator.generate(generator, prompts, params)
                seconds = time.perf_counter() - t0
                ours_ids = [c.token_ids for c in out]
                record["backend_no_stop"] = _gen_record(seconds, ours_ids)
                record["backend_no_stop"]["same_tokens_as_plain"] = ours_ids == plain_ids
        iterations.append(record)
        logger.info(
            "%s/%s it %d%s: rollout %.1fs (%d tok, gen %.1fs, env %.2fs) adv %.2fs update %.1fs "
            "(fwd+bwd %.1fs, optimizer %.2fs)%s%s",
            args.model,
            args.algo,
            it,
            " (warm-up)" if warmup else "",
            record["rollout_s"],
            record["generated_tokens"],
            gen_s,
            env_time.step_s,
            record["advantage_s"],
            record["update_s"],
            record["update_forward_backward_s"],
            record["update_optimizer_s"],
            f" | plain generate {record['plain_generate']['tokens_per_s']:.1f} tok/s"
            if "plain_generate" in record
            else "",
            f", backend {record['backend_no_stop']['tokens_per_s']:.1f} tok/s"
            if "backend_no_stop" in record
            else "",
        )
    memory.__exit__(None, None, None)
    agent.close()
    env_time.close()
    sandbox.close()
    usage_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "model": args.model,
        "model_name": model_name,
        "algo": args.algo,
        "parameters": sum(p.numel() for p in agent.trainable.parameters()),
        "config": config.to_dict(),
        "rollout": dataclasses.asdict(rollout),
        "torch_threads": torch.get_num_threads(),
        "load_s": load_s,
        "rss_after_load_bytes": rss_after_load,
        "peak_rss_trainer_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_rss_reaped_children_bytes": usage_children.ru_maxrss * 1024,
        "peak_rss_tree_sampled_bytes": memory.peak,
        "peak_rss_sandbox_sampled_bytes": memory.peak_children,
        "iterations": iterations,
        "numpy": np.__version__,
    }


# ---------------------------------------------------------------------------------------- parent


def _median(rows: list[dict], key: str, sub: str | None = None) -> float:
    values = [(r[key][sub] if sub else r[key]) for r in rows]
    return statistics.median(values)


def summarize(result: dict) -> dict:
    """Medians over the measured iterations; ratios are taken per iteration, then the median."""
    rows = [r for r in result["iterations"] if not r["warmup"]]

    def median(key: str) -> float | None:
        values = [r[key] for r in rows if r.get(key) is not None]
        return statistics.median(values) if values else None

    s = {
        key: median(key)
        for key in (
            "rollout_s",
            "advantage_s",
            "update_s",
            "generated_tokens",
            "rollout_tokens_per_s",
            "update_tokens_per_s",
            "generate_s",
            "generate_tokens_per_s",
            "env_step_s",
            "env_reset_s",
            "rollout_other_s",
            "slot_utilisation",
            "update_forward_backward_s",
            "update_optimizer_s",
            "update_sequence_tokens",
            "update_padded_tokens",
            "update_loss_tokens",
            "update_rows",
            "batch_rows",
            "rows_with_signal",
            "update_processed_tokens_per_s",
            "update_all_tokens_per_s",
            "turns_mean",
        )
    }
    s["iteration_s"] = statistics.median(
        r["rollout_s"] + r["advantage_s"] + r["update_s"] for r in rows
    )
    s["plain_tokens_per_s"] = statistics.median(r["plain_generate"]["tokens_per_s"] for r in rows)
    s["rollout_vs_plain"] = statistics.median(
        r["rollout_tokens_per_s"] / r["plain_generate"]["tokens_per_s"] for r in rows
    )
    s["generate_vs_plain"] = statistics.median(
        r["generate_tokens_per_s"] / r["plain_generate"]["tokens_per_s"] for r in rows
    )
    backend = [r for r in rows if "backend_no_stop" in r]
    if backend:
        s["backend_tokens_per_s"] = statistics.median(
            r["backend_no_stop"]["tokens_per_s"] for r in backend
        )
        s["backend_vs_plain"] = statistics.median(
            r["backend_no_stop"]["tokens_per_s"] / r["plain_generate"]["tokens_per_s"]
            for r in backend
        )
        s["backend_same_tokens"] = all(
            r["backend_no_stop"]["same_tokens_as_plain"] for r in backend
        )
    s["measured_iterations"] = len(rows)
    return s


def run_config(model: str, algo: str, args: argparse.Namespace) -> dict:
    iterations = args.iterations if model == "tiny" else args.default_iterations
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            "--model",
            model,
            "--algo",
            algo,
            "--iterations",
            str(iterations),
            "--warmup",
            str(args.warmup),
            "--max-new-tokens",
            str(args.max_new_tokens),
            "--max-turns",
            str(args.max_turns),
            "--threads",
            str(args.threads),
            "--worker-out",
            str(out),
        ]
        if not args.skip_flat_rows:
            cmd.append("--full-update")
        if model == "default":
            cmd += ["--warmup-new-tokens", str(args.default_warmup_new_tokens)]
        if model == "tiny" or algo == args.algos[0]:
            cmd.append("--backend-baseline")
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": str(args.threads),
        }
        load = os.getloadavg()[0]
        commit = git_commit()  # other work lands on this repository while the benchmark runs
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            raise RuntimeError(f"{model}/{algo} worker failed with exit code {proc.returncode}")
        result = json.loads(out.read_text())
    result["commit"] = commit
    result["wall_s"] = wall
    result["load_at_start"] = load
    result["load_at_end"] = os.getloadavg()[0]
    result["peak_rss_wait4_bytes"] = usage.ru_maxrss * 1024
    result["summary"] = summarize(result)
    return result


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _intro(report: dict) -> list[str]:
    """Heading: machine, load and the shape every configuration ran at."""
    m, shape = report["machine"], report["shape"]
    loads = [" / ".join(f"{x:.2f}" for x in report[k]) for k in ("load_start", "load_end")]
    heading = (
        f"{m['date']} · {m['cpu']} · {m['cpus']} cores · Python {m['python']} · "
        f"torch {m['torch']} · transformers {m['transformers']} · commit {m['commit']}"
    )
    load = (
        f"Load average (1 / 5 / 15 min) at start {loads[0]}, at end {loads[1]}: a shared "
        f"{m['cpus']}-core machine, so absolute numbers move with other work. Read the medians "
        "and the ratios; each ratio is taken against a baseline run seconds later in the same "
        "process."
    )
    setup = (
        f"Shape: TIR-Math-v0 (procedural problems, local sandbox), "
        f"{shape['prompts_per_iteration']} prompts x {shape['group_size']} samples, "
        f"max_new_tokens {report['max_new_tokens']} per turn, max_turns {report['max_turns']}, "
        f"temperature 1, minibatch {shape['minibatch_size']} in {shape['grad_accum_steps']} "
        f"micro-batches, {shape['update_epochs']} update epoch (PPO's default is 2), fp32, "
        f"{report['threads']} torch thread(s); PPO at the same shape (its default is 64 x 1). "
        "Each configuration runs in its own "
        f"subprocess: {report['warmup']} warm-up iteration (tiny: full shape; default model: "
        f"{report['default_warmup_new_tokens']} new tokens per turn, which pays the first-call "
        f"costs), then medians over {report['iterations']} measured iterations (tiny) / "
        f"{report['default_iterations']} (default model). Whole run: "
        f"{report['wall_s'] / 60:.1f} min."
    )
    lines = ["# Training throughput benchmark", "", heading, "", load, "", setup, ""]
    return lines


def _throughput_section(report: dict) -> list[str]:
    """Tokens/s, seconds per phase and peak memory per configuration."""
    lines = ["## Throughput, seconds per phase, peak memory", ""]
    rows = []
    for r in report["results"]:
        s = r["summary"]
        rows.append(
            [
                r["model"],
                r["algo"],
                f"{s['rollout_tokens_per_s']:.1f}",
                _fmt(s["update_processed_tokens_per_s"], ".1f"),
                f"{s['update_rows']:.0f}/{s['batch_rows']:.0f}",
                f"{s['rows_with_signal']:.0f}/{s['batch_rows']:.0f}",
                f"{s['rollout_s']:.2f}",
                f"{s['advantage_s']:.3f}",
                f"{s['update_s']:.2f}",
                f"{s['iteration_s']:.2f}",
                f"{s['generated_tokens']:.0f}",
                _gib(r["peak_rss_trainer_bytes"]),
                _gib(r["peak_rss_tree_sampled_bytes"]),
            ]
        )
    lines += md_table(
        [
            "model",
            "algo",
            "rollout tok/s",
            "update tok/s",
            "rows updated",
            "rows with signal",
            "rollout s",
            "advantage s",
            "update s",
            "iteration s",
            "generated tok",
            "peak RSS trainer GiB",
            "peak RSS tree GiB",
        ],
        rows,
    )
    lines += [
        "",
        (
            "rollout tok/s: generated tokens / rollout seconds (`tokens/rollout_per_s`). update "
            "tok/s: loss tokens (generated tokens) of the rows the update ran on / update seconds. "
            "Rows updated / rows with signal: by default the agent leaves rows whose advantages "
            "are all 0 out of the forward pass when no KL, entropy or value term reads them "
            "(a group whose samples all scored the same), so GTPO/GRPO's update cost depends on "
            "the rewards; on an untrained model that can be every row. "
            + (
                "To time the update itself, this run sets skip_flat_rows=False, which makes the "
                "agent run every row (the gradient is the same); 'rows with signal' is "
                "how many the default config would have trained on (its update time scales "
                "roughly with that fraction). "
                if report.get("full_update")
                else "This run keeps that default, so 'rows updated' is what it trained on. "
            )
            + "PPO always runs every row. The agent's own `tokens/update_per_s` counts every "
            "row's loss tokens, run or skipped (`update_tokens_per_s` in the JSON). PPO's "
            "advantage phase includes the critic's "
            "forward pass over the batch. Peak RSS "
            "trainer: `ru_maxrss` of the training process; tree: sampled every 0.1 s over the "
            "trainer plus its sandbox processes (forked, so shared pages count more than once)."
        ),
        "",
    ]

    return lines


def _rollout_section(report: dict) -> list[str]:
    """The rollout against plain `model.generate` on the same prompts."""
    lines = ["## Inside the rollout: against plain `model.generate` on the same prompts", ""]
    rows = []
    for r in report["results"]:
        s = r["summary"]
        rows.append(
            [
                r["model"],
                r["algo"],
                f"{s['plain_tokens_per_s']:.1f}",
                _fmt(s.get("backend_tokens_per_s"), ".1f"),
                _fmt(s.get("backend_vs_plain"), ".2f"),
                f"{s['generate_tokens_per_s']:.1f}",
                f"{s['rollout_tokens_per_s']:.1f}",
                f"{s['rollout_vs_plain']:.2f}",
                f"{s['generate_s'] / s['rollout_s']:.0%}",
                f"{s['env_step_s']:.2f}",
                f"{s['rollout_other_s']:.2f}",
                f"{s['slot_utilisation']:.0%}",
                f"{s['turns_mean']:.2f}",
            ]
        )
    lines += md_table(
        [
            "model",
            "algo",
            "plain generate tok/s",
            "backend, no stop tok/s",
            "backend / plain",
            "generate tok/s in rollout",
            "rollout tok/s",
            "rollout / plain",
            "generate share of rollout",
            "env step s",
            "other s",
            "decode-slot use",
            "turns",
        ],
        rows,
    )
    lines += [
        "",
        (
            "Plain generate: `model.generate` on the left-padded batch of the iteration's 16 "
            "first-turn prompts (4 problems x 4), same sampling (temperature 1, top-k off), eos only: "
            "no logprobs, no stop strings, no env; tokens counted up to eos. Backend, no stop: our "
            "`hf` generator (with its logprob recorder) on the same prompts, same seed, no stop "
            "string: the same tokens until a row ends at eos (`same_tokens_as_plain` in the JSON), "
            "after which it draws and computes only the live rows; run in every tiny configuration "
            "and in the first default-model one. "
            "Generate tok/s in rollout: tokens / seconds inside the generator over all turns. "
            "Rollout / plain: the whole multi-turn collection (each turn's generation, stopping at "
            "the closing code fence; env steps with sandbox and grader; tokenizing tool output) "
            "against the plain baseline. Decode-slot use: kept tokens / (rows x decode steps) over "
            "the rollout's generate calls (a batch decodes until its longest row stops)."
        ),
        "",
    ]

    return lines


def _update_section(report: dict) -> list[str]:
    """Where the update phase spends its time, and memory."""
    lines = ["## Inside the update, and memory", ""]
    rows = []
    for r in report["results"]:
        s = r["summary"]
        rows.append(
            [
                r["model"],
                r["algo"],
                f"{r['parameters'] / 1e6:.2f}M",
                f"{s['update_forward_backward_s']:.2f}",
                f"{s['update_optimizer_s']:.2f}",
                f"{s['update_sequence_tokens']:.0f}",
                f"{s['update_padded_tokens']:.0f}",
                _fmt(s["update_all_tokens_per_s"], ".0f"),
                _gib(r["rss_after_load_bytes"]),
                _gib(r["peak_rss_trainer_bytes"]),
                _gib(r["peak_rss_tree_sampled_bytes"]),
                _gib(r["peak_rss_sandbox_sampled_bytes"]),
            ]
        )
    lines += md_table(
        [
            "model",
            "algo",
            "params",
            "fwd+bwd s",
            "optimizer s",
            "sequence tokens",
            "padded tokens",
            "all tokens/s",
            "RSS after load GiB",
            "peak trainer GiB",
            "peak tree GiB",
            "sandbox procs GiB",
        ],
        rows,
    )
    lines += [
        "",
        (
            "fwd+bwd: time in `Agent._micro_step` (forward, logprobs, loss, backward); optimizer: "
            "`AdamW.step`; the rest of the update phase is gradient clipping and slicing. Sequence "
            "tokens: every token the micro-steps ran over (prompt, generated and tool output, x "
            "epochs); padded: the same including right padding to each micro-batch's longest row. "
            "all tokens/s: sequence tokens / update seconds (the usual training tokens/s)."
        ),
    ]

    return lines


def _notes(report: dict) -> list[str]:
    """Code changes during the run, the thread probe and free-form notes."""
    lines: list[str] = []
    commits = sorted({r["commit"] for r in report["results"]})
    if len(commits) > 1:
        lines += [
            "",
            "Code under test changed during the run (others commit to this repository): "
            + "; ".join(f"{r['model']}/{r['algo']} at {r['commit']}" for r in report["results"])
            + ".",
        ]
    probe = report.get("thread_probe")
    if probe:
        lines += [
            "",
            "## Torch threads on this shared machine",
            "",
            (
                "Tiny model, forward + backward over 2 x 128 tokens, median of "
                f"{probe['repeats']} in a fresh process per setting: "
                + ", ".join(f"{n} thread(s) {t * 1e3:.0f} ms" for n, t in probe["median_s"].items())
                + f" (load average {probe['load']:.2f}). This is why the workers run with "
                f"{report['threads']} thread(s): OpenMP threads that wait for each other at every "
                "barrier lose badly when other processes hold the cores."
            ),
        ]
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return lines


def write_markdown(report: dict, path: Path) -> None:
    lines = [*_intro(report), *_throughput_section(report), *_rollout_section(report),
             *_update_section(report), *_notes(report)]
    path.write_text("\n".join(lines) + "\n")

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: tiny model only, 1 measured iteration, 32 new tokens",
    )
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--algos", nargs="+", choices=ALGOS, default=list(ALGOS))
    parser.add_argument(
        "--iterations",
        type=int,
        default=4,
        help="measured iterations per configuration on the tiny model",
    )
    parser.add_argument(
        "--default-iterations",
        type=int,
        default=1,
        help="measured iterations per configuration on the default model",
    )
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--default-warmup-new-tokens",
        type=int,
        default=16,
        help="turn budget of the default model's warm-up iteration",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads per worker (1: on a shared, loaded machine "
        "2 OpenMP threads on 2 cores run several times slower than 1)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=ROLLOUT["max_new_tokens"])
    parser.add_argument("--max-turns", type=int, default=ROLLOUT["max_turns"])
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results directory (default benchmarks/results; --quick: a temp dir)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--algo", choices=ALGOS, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--warmup-new-tokens", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--backend-baseline", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--probe-threads", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--full-update", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--skip-flat-rows",
        action="store_true",
        help="time the update as the default config runs it (rows with all-zero advantages "
        "skipped) instead of over every row",
    )
    parser.add_argument("--probe-repeats", type=int, default=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in ("httpx", "algos", "tir_envs"):
        logging.getLogger(name).setLevel(logging.WARNING)

    if args.worker:
        args.worker_out.write_text(json.dumps(_worker(args)))
        return
    if args.probe_threads:
        print(_probe_threads(args.probe_threads, args.probe_repeats))
        return

    if args.quick:
        args.models, args.iterations, args.default_iterations = ["tiny"], 1, 1
        args.max_new_tokens = 32
    report: dict[str, Any] = {
        "machine": machine_info(),
        "quick": args.quick,
        "shape": SHAPE,
        "max_new_tokens": args.max_new_tokens,
        "max_turns": args.max_turns,
        "iterations": args.iterations,
        "default_iterations": args.default_iterations,
        "warmup": args.warmup,
        "threads": args.threads,
        "full_update": not args.skip_flat_rows,
        "default_warmup_new_tokens": args.default_warmup_new_tokens,
        "load_start": list(os.getloadavg()),
        "results": [],
    }
    started = time.perf_counter()
    for model in args.models:
        for algo in args.algos:
            logger.info("=== %s / %s", model, algo)
            report["results"].append(run_config(model, algo, args))
    report["thread_probe"] = thread_probe(3)
    report["wall_s"] = time.perf_counter() - started
    report["load_end"] = list(os.getloadavg())
    out = args.out or (
        Path(tempfile.mkdtemp(prefix="tir-bench-train-"))
        if args.quick
        else ROOT / "benchmarks" / "results"
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.json").write_text(json.dumps(report, indent=1) + "\n")
    write_markdown(report, out / "train.md")
    print((out / "train.md").read_text())
    logger.info("wrote %s", out / "train.md")


if __name__ == "__main__":
    main()
