"""The ``tir`` command: ``tir train``, ``tir eval``, ``tir leaderboard``, ``tir data check``.

Configs: ``--config run.toml`` (top-level keys are the algorithm's config fields, a ``[rollout]``
table the rollout's) and repeatable ``--set key=value`` overrides (``--set lr=1e-5``,
``--set rollout.max_new_tokens=128``), applied in that order over the algorithm's defaults.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import resource
import shlex
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from algos.models import DEFAULT_MODEL

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  pretty_exceptions_show_locals=False,
                  help="tir-gym: train and evaluate language models on TIR environments.")
logger = logging.getLogger("tir")

# The main job's defaults (`make train`), sized for a 15-minute training budget (warm-up and RL)
# on 2 CPU cores; README.md has the measured times. Short turns: the warmed-up model's turns are
# a one-line program and a boxed number, and on a CPU sequence length is most of the cost.
MAIN_JOB = {
    "prompts_per_iteration": 4,
    "group_size": 4,
    "minibatch_size": 8,
    "grad_accum_steps": 2,
    "lr": 3e-5,
    "rollout.max_new_tokens": 48,
    "rollout.max_turns": 2,
    "rollout.max_total_tokens": 512,
    "rollout.temperature": 0.8,
}
MAIN_WARMUP = {
    "kinds": ("digit_sum", "nth_prime"),
    "traces": 128,
    "epochs": 1,
    "batch_size": 8,
    "lr": 3e-4,
}
"""The main job's warm-up (``algos.warmup.WarmupConfig`` fields; ``--set warmup.<field>=...``)."""
MAIN_JOB_RUN = {"iterations": 8, "eval_problems": 32, "eval_samples": 2, "train_layers": 8}
"""The main job's run shape: RL iterations, held-out problems x samples (at the rollout
temperature), and how many top transformer blocks train (0 = all)."""
LIBRARY_RUN = {"iterations": 6, "eval_problems": 16, "eval_samples": 1, "train_layers": 0}


def _coerce(field_type: Any, raw: str) -> Any:
    """Parse an override string into the field's type (``typing`` hints arrive as strings)."""
    text = str(field_type)
    if raw.lower() == "none" and "None" in text:
        return None
    if "bool" in text:
        if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise typer.BadParameter(f"expected a boolean, got {raw!r}")
        return raw.lower() in ("true", "1", "yes")
    for name, cast in (("int", int), ("float", float)):
        if text.startswith(name) or text == f"<class '{name}'>":
            try:
                return cast(raw)
            except ValueError:
                raise typer.BadParameter(f"expected {name}, got {raw!r}") from None
    if "tuple" in text:
        return tuple(x for x in raw.split(",") if x)
    return raw


def apply_overrides(cls: type, base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Merge overrides into ``base`` after checking each key is a field of ``cls``."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    merged = dict(base)
    for key, value in overrides.items():
        if key not in fields:
            raise typer.BadParameter(
                f"{cls.__name__} has no field {key!r}; fields: {', '.join(sorted(fields))}"
            )
        merged[key] = _coerce(fields[key].type, value) if isinstance(value, str) else value
    return merged


def build_configs(algo: str, config_file: Optional[Path], sets: list[str], defaults: dict):
    """The algorithm config and rollout config from defaults, a TOML file and ``--set`` pairs."""
    import algos
    from algos.rollout import RolloutConfig

    try:
        cls = algos.get_algorithm(algo).config_class
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    algo_values: dict[str, Any] = {}
    rollout_values: dict[str, Any] = {}

    def route(key: str, value: Any) -> None:
        if key.startswith("rollout."):
            rollout_values[key.removeprefix("rollout.")] = value
        else:
            algo_values[key] = value

    for key, value in defaults.items():
        route(key, value)
    if config_file is not None:
        if not config_file.is_file():
            raise typer.BadParameter(f"config file {config_file} does not exist")
        data = tomllib.loads(config_file.read_text())
        for key, value in data.pop("rollout", {}).items():
            rollout_values[key] = value
        for key, value in data.items():
            algo_values[key] = value
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--set expects key=value, got {item!r}")
        route(key.strip(), value.strip())
    try:
        config = cls(**apply_overrides(cls, {}, algo_values))
        rollout = RolloutConfig(**apply_overrides(RolloutConfig, {}, rollout_values))
    except (TypeError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from None
    return config, rollout


def peak_memory_gib() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


THREADS_HELP = "torch CPU threads (default: torch's choice); 1 is much faster on a shared machine"
BACKEND_HELP = ("hf (in process), hf-continuous (in process, transformers' continuous batching) or "
                "vllm-server (a vLLM server, loaded with the model)")
VLLM_PYTHON_HELP = ("vllm-server: the python that starts vLLM (default: the venv "
                    "scripts/vllm_venv.sh builds)")
VLLM_ARGS_HELP = "vllm-server: more flags for the server it starts, e.g. '--enforce-eager'"


def _setup(verbose: bool, threads: Optional[int] = None) -> None:
    """Logging for the command, and torch's thread count: OpenMP threads that compete with other
    processes for cores spin and stall, so on a shared machine fewer threads can be faster."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "filelock", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def split_warmup_sets(sets: list[str]) -> tuple[list[str], dict[str, str]]:
    """``--set warmup.<field>=value`` pairs (the warm-up's config) apart from the others."""
    rest, warm = [], {}
    for item in sets:
        key, sep, value = item.partition("=")
        if sep and key.strip().startswith("warmup."):
            warm[key.strip().removeprefix("warmup.")] = value.strip()
        else:
            rest.append(item)
    return rest, warm


def build_warmup_config(values: dict[str, Any], threads: Optional[int]):
    """The warm-up's config: ``MAIN_WARMUP`` under ``--set warmup.<field>`` overrides."""
    from algos.warmup import TraceMix, WarmupConfig

    merged = {**MAIN_WARMUP, **values}
    if "kinds" in values:
        merged["kinds"] = tuple(k for k in values["kinds"].split(",") if k)
    mix = {}
    for name in ("wrong_code", "guess"):
        if f"mix.{name}" in merged:
            mix[name] = float(merged.pop(f"mix.{name}"))
    merged = apply_overrides(WarmupConfig, {}, merged)
    if "threads" not in merged:
        import torch

        merged["threads"] = threads or torch.get_num_threads()
    try:
        if mix:
            merged["mix"] = TraceMix(**mix)
        return WarmupConfig(**merged)
    except (TypeError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from None


def evaluate_agent(agent, problem_ids: list[str], samples: int, temperature: float) -> dict:
    """The agent's summary on ``problem_ids`` plus a 95% bootstrap interval of pass@1 and the
    per-sample records (what paired intervals between two evaluations need)."""
    from algos.evaluation import bootstrap_pass1, evaluate_problems, summarize

    params = dataclasses.replace(agent.sampling_params(agent.config.seed), temperature=temperature)
    records = evaluate_problems(agent.vec_env(), agent.generator, agent.tokenizer, problem_ids,
                                params, samples=samples,
                                max_total_tokens=agent.rollout.max_total_tokens)
    summary = summarize(records)
    summary["pass@1_ci95"] = list(bootstrap_pass1(records))
    summary["temperature"] = temperature
    summary["records"] = records
    return summary


def _cached_eval(path: Path, run: Any) -> dict:
    """An evaluation saved in the run dir (a resumed run does not redo it), else ``run()``."""
    if path.exists():
        return json.loads(path.read_text())
    result = run()
    path.write_text(json.dumps(result, indent=2))
    return result


@app.command()
def train(
    algo: Annotated[str, typer.Option(help="gtpo | grpo | ppo, or any registered algorithm")] = "gtpo",
    env: Annotated[str, typer.Option(help="a registered TIR env id")] = "TIR-Math-v0",
    model: Annotated[str, typer.Option(help="HF model dir, .gguf file or hub id")] = DEFAULT_MODEL,
    iterations: Annotated[Optional[int], typer.Option(
        min=0, help="RL iterations (default: the main job's)")] = None,
    config: Annotated[Optional[Path], typer.Option(help="TOML config file")] = None,
    set_: Annotated[list[str], typer.Option(
        "--set", help="override: key=value, rollout.key=value or warmup.key=value",
    )] = [],  # noqa: B006
    run_dir: Annotated[Optional[Path], typer.Option(help="default: runs/<algo>-<env>")] = None,
    resume: Annotated[bool, typer.Option(help="continue from run_dir's last checkpoint")] = False,
    eval_problems: Annotated[Optional[int], typer.Option(
        min=0, help="held-out problems before/after (default: the main job's)")] = None,
    eval_samples: Annotated[Optional[int], typer.Option(
        min=1, help="samples per held-out problem (default: the main job's)")] = None,
    eval_temperature: Annotated[Optional[float], typer.Option(
        min=0.0, help="0 = greedy (default: the rollout temperature)")] = None,
    eval_split: Annotated[str, typer.Option(
        help="test | validation: which held-out problems (tune on validation)")] = "test",
    warmup: Annotated[Optional[bool], typer.Option(
        help="supervised cold start before RL (default: on for the main job on TIR-Math-v0)",
    )] = None,
    train_layers: Annotated[Optional[int], typer.Option(
        min=0, help="train only the top N transformer blocks (0 = all; default: the main job's)",
    )] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="benchmark files (TIR_DATA_DIR)")] = None,
    backend: Annotated[str, typer.Option(
        help=f"rollouts from {BACKEND_HELP}, reloaded after each update")] = "hf",
    vllm_python: Annotated[Optional[Path], typer.Option(help=VLLM_PYTHON_HELP)] = None,
    vllm_args: Annotated[Optional[str], typer.Option(help=VLLM_ARGS_HELP)] = None,
    server_url: Annotated[Optional[str], typer.Option(
        help="vllm-server: a vLLM server you run (VLLM_SERVER_DEV_MODE=1, --logprobs-mode "
             "processed_logprobs) that can read --run-dir, e.g. http://host:8000/v1")] = None,
    env_workers: Annotated[str, typer.Option(
        help="sync: envs in this process | ray: envs in Ray actors, each with its own sandbox "
             "(pip install tir-gym[ray])")] = "sync",
    ray_address: Annotated[Optional[str], typer.Option(
        help="with --env-workers ray: the cluster to join (e.g. auto); default: a local one")] = None,
    envs_per_actor: Annotated[int, typer.Option(
        min=1, help="with --env-workers ray: envs sharing one actor and its sandbox")] = 1,
    main_job_defaults: Annotated[bool, typer.Option(help="CPU-sized defaults")] = True,
    threads: Annotated[Optional[int], typer.Option(min=1, help=THREADS_HELP)] = None,
    nproc: Annotated[Optional[int], typer.Option(
        min=1, help="data-parallel training processes on this machine (torchrun --standalone); "
                    "each rolls out and trains prompts_per_iteration / N prompts")] = None,
    progress: bool = True,
    verbose: bool = False,
) -> None:
    """Train a model with an RL algorithm on a TIR env; report held-out accuracy before and after.

    With ``--warmup`` (the main job's default on TIR-Math-v0) a supervised cold start
    (``algos.warmup``) runs first on synthetic tool-use traces of the main job's procedural kinds,
    RL trains on the same kinds, and the report has ``before``, ``after_warmup`` and ``after``,
    all on the same held-out problems under the same protocol.
    """
    _setup(verbose, threads)
    import algos
    from algos.distributed import launched_ranks
    from algos.evaluation import heldout_problems, problem_source
    from algos.generation.base import GenerationError
    from algos.generation.server import ServerStartError
    from algos.models import load_policy, train_top_layers

    job = MAIN_JOB_RUN if main_job_defaults else LIBRARY_RUN
    iterations = job["iterations"] if iterations is None else iterations
    eval_problems = job["eval_problems"] if eval_problems is None else eval_problems
    eval_samples = job["eval_samples"] if eval_samples is None else eval_samples
    train_layers = job["train_layers"] if train_layers is None else train_layers
    if eval_split not in ("test", "validation"):
        raise typer.BadParameter(f"--eval-split must be test or validation, got {eval_split!r}")
    if warmup is None:
        warmup = main_job_defaults and env == "TIR-Math-v0"
    elif warmup and env != "TIR-Math-v0":
        raise typer.BadParameter("the warm-up's traces are procedural TIR-Math-v0 problems: "
                                 f"--warmup needs --env TIR-Math-v0, got {env!r}")
    server = rollout_server(backend, vllm_python, vllm_args, server_url)
    sets, warm_sets = split_warmup_sets(set_)
    if warm_sets and not warmup:
        raise typer.BadParameter("warmup.* settings need --warmup")
    defaults = MAIN_JOB if main_job_defaults else {}
    algo_config, rollout = build_configs(algo, config, sets, defaults)
    check_backend(backend, rollout.top_p)
    warm_config = build_warmup_config(warm_sets, threads) if warmup else None
    if eval_temperature is None:
        eval_temperature = rollout.temperature if main_job_defaults else 0.0
    temperature = eval_temperature
    run_dir = run_dir or Path("runs") / f"{algo}-{env}"
    if run_dir.exists() and not resume and any(run_dir.iterdir()):
        raise typer.BadParameter(f"{run_dir} exists; pass --resume to continue it or another --run-dir")
    if server is not None and max(nproc or 1, launched_ranks()) > 1:
        raise typer.BadParameter("--backend vllm-server serves one training process; with "
                                 "several, every rank would reload the same server")
    ranks = start_ranks(nproc, algo_config)
    env_kwargs: dict[str, Any] = {"data_dir": str(data_dir)} if data_dir else {}
    if env_workers not in ("sync", "ray"):
        raise typer.BadParameter(f"--env-workers must be sync or ray, got {env_workers!r}")
    if env_workers != "ray" and (ray_address or envs_per_actor != 1):
        raise typer.BadParameter("--ray-address and --envs-per-actor need --env-workers ray")
    if env_workers == "ray":
        ray_init = {"address": ray_address} if ray_address else {}
        env_kwargs.update(env_workers="ray",
                          ray_options={"envs_per_actor": envs_per_actor, "ray_init": ray_init})
    heldout: Optional[list[str]] = None
    if warm_config is not None:
        from algos.warmup import heldout_ids
        from tir_envs.procedural import ProceduralProblems

        env_kwargs.update(problems=ProceduralProblems(warm_config.kinds),
                          system_prompt=warm_config.system_prompt)
        per_kind = -(-eval_problems // len(warm_config.kinds))
        heldout = heldout_ids(warm_config.kinds, per_kind, eval_split)[:eval_problems]
    elif eval_split != "test":
        raise typer.BadParameter("--eval-split validation needs --warmup (its procedural split)")
    warm_root = run_dir / "warmup"
    warm_ready = warm_config is not None and (warm_root / "warmup.json").exists()
    started = time.perf_counter()
    phases: dict[str, float] = {}
    try:
        policy, tokenizer = load_policy(model, dtype=algo_config.dtype)
        blocks = len(getattr(getattr(policy, "model", None), "layers", ()) or ())
        trainable = (train_top_layers(policy, min(train_layers, blocks))
                     if train_layers and blocks > train_layers else None)
        agent = algos.make(algo, policy, env, algo_config, tokenizer=tokenizer, rollout=rollout,
                           run_dir=run_dir, env_kwargs=env_kwargs,
                           accelerator=ranks.accelerator)
        # last: a server started here is stopped only by the `with` below
        generator = (server.generator(policy, tokenizer, run_dir / "server-weights") if server
                     else local_generator(backend, agent.policy, tokenizer))
    except (ValueError, TypeError, OSError, GenerationError, ServerStartError) as exc:
        raise typer.BadParameter(str(exc)) from None
    if generator is not None:
        agent.generator = generator
    main = ranks.is_main
    run_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"algo": algo, "env": env, "model": model,
                              "config": algo_config.to_dict(),
                              "rollout": dataclasses.asdict(rollout),
                              "trainable_parameters": trainable, "env_workers": env_workers,
                              "processes": ranks.world}
    with agent, generator or contextlib.nullcontext():
        if heldout is None and eval_problems:
            heldout = heldout_problems(problem_source(agent.vec_env()), eval_problems)
        report["eval"] = {"split": eval_split, "problems": heldout, "samples": eval_samples,
                          "temperature": temperature}

        def timed_eval(name: str) -> dict:
            t0 = time.perf_counter()
            typer.echo(f"evaluating on {len(heldout)} held-out problems x {eval_samples} "
                       f"samples ({name})")
            result = evaluate_agent(agent, heldout, eval_samples, temperature)
            phases[f"eval_{name}_s"] = round(time.perf_counter() - t0, 1)
            return result

        evals: dict[str, dict] = {}
        if eval_problems and main:
            evals["before"] = _cached_eval(run_dir / "eval_before.json",
                                           lambda: timed_eval("before"))
        if warm_config is not None:
            from algos.warmup import warm_up

            t0 = time.perf_counter()
            if not warm_ready and main:
                typer.echo(f"warm-up: {warm_config.traces} traces x {warm_config.epochs} epochs")
            try:
                with ranks.main_first():  # the others reuse rank 0's warm-up checkpoint
                    warm_dir = warm_up(agent.policy, agent.tokenizer, warm_config, warm_root)
            except ValueError as exc:
                raise typer.BadParameter(str(exc)) from None
            if warm_ready or not main:  # made by an earlier (killed) run or by rank 0: load it
                agent.load_weights(warm_dir)
            agent.generator.update_weights(agent.policy)
            phases["warmup_s"] = round(time.perf_counter() - t0, 1)
            report["warmup"] = json.loads((warm_root / "warmup.json").read_text())
            if eval_problems and main:
                evals["after_warmup"] = _cached_eval(run_dir / "eval_after_warmup.json",
                                                     lambda: timed_eval("after_warmup"))
        resumed = resume and agent.resume()
        if main:
            typer.echo(f"training {algo} for {iterations} iterations" +
                       (f" (resumed at {agent.iteration})" if resumed else "") +
                       (f" on {ranks.world} processes" if ranks.world > 1 else ""))
        t0 = time.perf_counter()
        agent.learn(iterations, progress=progress)
        phases["rl_s"] = round(time.perf_counter() - t0, 1)
        if not main:
            return
        final = agent.save(run_dir / "final")
        if eval_problems:
            evals["after"] = timed_eval("after")
            (run_dir / "eval_after.json").write_text(json.dumps(evals["after"], indent=2))
    report.update(evaluation_report(evals))
    from algos.metrics import plot_curves

    curves = plot_curves(run_dir) if (run_dir / "metrics.jsonl").exists() else None
    report["peak_memory_gib"] = round(peak_memory_gib(), 2)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    report["phases_s"] = phases
    report["torch_threads"] = torch_threads()
    report["load_average"] = list(os.getloadavg())
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    print_summary(report, eval_samples)
    typer.echo(f"model: {final}  curves: {curves}  metrics: {run_dir / 'metrics.jsonl'}")


def rollout_server(backend: str, vllm_python: Optional[Path], vllm_args: Optional[str],
                   server_url: Optional[str]):
    """``--backend`` and its server flags as an ``algos.generation.server.RolloutServer``
    (``None``: an in-process backend), refused before any work when they cannot work."""
    if backend not in LOCAL_BACKENDS + ("vllm-server",):
        raise typer.BadParameter(f"--backend must be one of {', '.join(LOCAL_BACKENDS)} or "
                                 f"vllm-server, got {backend!r}")
    server_flags = {"--vllm-python": vllm_python, "--vllm-args": vllm_args,
                    "--server-url": server_url}
    given = [flag for flag, value in server_flags.items() if value is not None]
    if backend in LOCAL_BACKENDS:
        if given:
            raise typer.BadParameter(f"{', '.join(given)} need --backend vllm-server")
        return None
    if server_url is not None and len(given) > 1:
        raise typer.BadParameter("--server-url uses a server you run; --vllm-python and "
                                 "--vllm-args configure one tir starts: pass one or the other")
    from algos.generation.server import RolloutServer

    try:
        return RolloutServer(vllm_python, tuple(shlex.split(vllm_args or "")), server_url)
    except (FileNotFoundError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from None


LOCAL_BACKENDS = ("hf", "hf-continuous")


def check_backend(backend: str, top_p: float) -> None:
    if backend == "hf-continuous" and top_p < 1.0:
        raise typer.BadParameter("--backend hf-continuous reports logprobs after top-p "
                                 "truncation: use rollout.top_p=1 or --backend hf")


def local_generator(backend: str, policy, tokenizer):
    """The in-process backend to use instead of the agent's default ``hf`` one (``None``: keep
    it); it samples from ``policy`` itself, so updates need no weight sync."""
    if backend != "hf-continuous":
        return None
    from algos.generation import make_generator

    return make_generator(backend, model=policy, tokenizer=tokenizer)


def start_ranks(nproc: Optional[int], config):
    """This process's view of the run's processes. With ``--nproc N`` outside a launcher, run
    this same command line in N processes under torchrun and exit with its status."""
    from algos.distributed import (
        Ranks,
        check_split,
        launched_ranks,
        make_accelerator,
        torchrun_command,
    )

    launched = launched_ranks()
    if nproc is not None and launched > 1 and nproc != launched:
        raise typer.BadParameter(f"--nproc {nproc}, but the launcher started {launched} processes")
    try:
        check_split(config, max(launched, nproc or 1))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if launched == 1 and nproc is not None and nproc > 1:
        raise typer.Exit(subprocess.call(torchrun_command(nproc, sys.argv[1:])))
    ranks = Ranks(make_accelerator())
    ranks.barrier()  # every rank has checked the run dir before rank 0 writes in it
    return ranks


def evaluation_report(evals: dict[str, dict]) -> dict[str, Any]:
    """Each evaluation's summary (its per-sample records stay in ``eval_<name>.json``) and the
    gains with paired bootstrap intervals: RL's over its start (the warm-up checkpoint when there
    is one), and the whole job's over the base model."""
    from algos.evaluation import bootstrap_pass1

    report: dict[str, Any] = {}
    records = {name: result.pop("records") for name, result in evals.items()}
    for name, result in evals.items():
        result["records_file"] = f"eval_{name}.json"
        report[name] = result

    def gain(start: str) -> dict[str, Any]:
        low, high = bootstrap_pass1(records["after"], records[start])
        return {"pass@1": evals["after"]["pass@1"] - evals[start]["pass@1"],
                "ci95_paired": [low, high]}

    start = "after_warmup" if "after_warmup" in evals else "before"
    if "after" in evals and start in evals:
        report[f"rl_gain_over_{start}"] = gain(start)
    if "after" in evals and "before" in evals and start != "before":
        report["gain_over_before"] = gain("before")
    return report


def print_summary(report: dict[str, Any], eval_samples: int) -> None:
    typer.echo("")
    typer.echo(f"== {report['algo']} on {report['env']} with {report['model']}")
    for when in ("before", "after_warmup", "after"):
        if when in report:
            r = report[when]
            low, high = r["pass@1_ci95"]
            typer.echo(f"{when:>12}: pass@1 {r['pass@1']:.3f} [{low:.3f}, {high:.3f}] on "
                       f"{r['problems']} held-out problems x {eval_samples}, tool-call rate "
                       f"{r['tool_call_rate']:.2f}, mean turns {r['mean_turns']:.2f}")
    typer.echo(f"peak memory {report['peak_memory_gib']} GiB, wall time {report['wall_s']} s")


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


@app.command("eval")
def evaluate(
    model: Annotated[str, typer.Option(help="HF model dir, .gguf file or hub id")] = DEFAULT_MODEL,
    env: Annotated[str, typer.Option(help="a registered TIR env id")] = "TIR-Math-v0",
    limit: Annotated[int, typer.Option(min=1, help="problems to evaluate")] = 32,
    samples: Annotated[int, typer.Option(min=1, help="samples per problem (pass@k)")] = 1,
    temperature: Annotated[float, typer.Option(min=0.0)] = 0.0,
    batch: Annotated[int, typer.Option(min=1, help="episodes rolled out together")] = 8,
    max_new_tokens: int = 256,
    max_turns: int = 4,
    data_dir: Annotated[Optional[Path], typer.Option(help="benchmark files (TIR_DATA_DIR)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="write the summary as JSON")] = None,
    seed: int = 0,
    backend: Annotated[str, typer.Option(help=BACKEND_HELP)] = "hf",
    vllm_python: Annotated[Optional[Path], typer.Option(help=VLLM_PYTHON_HELP)] = None,
    vllm_args: Annotated[Optional[str], typer.Option(help=VLLM_ARGS_HELP)] = None,
    server_url: Annotated[Optional[str], typer.Option(
        help="vllm-server: a vLLM server you run (VLLM_SERVER_DEV_MODE=1, --logprobs-mode "
             "processed_logprobs) on this machine or one sharing its temp dir; it is loaded "
             "with --model")] = None,
    threads: Annotated[Optional[int], typer.Option(min=1, help=THREADS_HELP)] = None,
) -> None:
    """Evaluate a model on a TIR env under the common protocol."""
    _setup(False, threads)
    import tempfile

    from algos.evaluation import evaluate_problems, heldout_problems, problem_source, summarize
    from algos.generation import GenerationError, make_generator
    from algos.generation.base import SamplingParams
    from algos.generation.server import ServerStartError
    from algos.models import load_policy
    from algos.rollout import RolloutConfig, make_vec_env

    server = rollout_server(backend, vllm_python, vllm_args, server_url)
    rollout = RolloutConfig(max_new_tokens=max_new_tokens, max_turns=max_turns,
                            max_total_tokens=max(2048, 2 * max_new_tokens),
                            temperature=temperature)
    try:
        policy, tokenizer = load_policy(model)
    except (ValueError, OSError) as exc:
        raise typer.BadParameter(str(exc)) from None
    env_kwargs = {"data_dir": str(data_dir)} if data_dir else {}
    with contextlib.ExitStack() as stack:
        if server is not None:
            weights = stack.enter_context(tempfile.TemporaryDirectory(prefix="tir-eval-"))
            try:
                generator = server.generator(policy, tokenizer, weights)
            except (GenerationError, ServerStartError) as exc:
                raise typer.BadParameter(str(exc)) from None
        else:
            generator = make_generator(backend, model=policy, tokenizer=tokenizer)
        stack.enter_context(generator)
        vec_env, sandbox = make_vec_env(env, batch, tokenizer, rollout, env_kwargs)
        stack.callback(sandbox.close)
        stack.callback(vec_env.close)
        problems = heldout_problems(problem_source(vec_env), limit)
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                stop=rollout.stop, seed=seed)
        records = evaluate_problems(vec_env, generator, tokenizer, problems, params,
                                    samples=samples, max_total_tokens=rollout.max_total_tokens)
    summary = summarize(records)
    summary.update(model=model, env=env, temperature=temperature, backend=backend)
    text = json.dumps(summary, indent=2)
    if out:
        out.write_text(text)
    typer.echo(text)


@app.command()
def leaderboard(
    model: Annotated[list[str], typer.Option(
        help="HF model dir, .gguf or hub id, or label=path; repeatable "
             "(default: the default model unless --endpoint is given)")] = [],  # noqa: B006
    endpoint: Annotated[Optional[str], typer.Option(
        help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")] = None,
    endpoint_model: Annotated[Optional[str], typer.Option(help="the served model name")] = None,
    endpoint_tokenizer: Annotated[Optional[str], typer.Option(
        help="model dir or hub id of the endpoint's tokenizer (default: --endpoint-model)")] = None,
    benchmarks: Annotated[Optional[str], typer.Option(
        help="comma list (default: gsm8k,svamp,math500,aime24,amc23, the shipped five)")] = None,
    limit: Annotated[Optional[str], typer.Option(
        help="first N problems of each benchmark, or gsm8k=200,math500=100 (default: all)")] = None,
    protocol: Annotated[Optional[str], typer.Option(
        help="a named protocol whose settings the options below override: "
             "qwen25-math-tir (greedy pass@1, 4 calls x 2048 tokens) or tir-gym-cpu")] = None,
    samples: Annotated[Optional[int], typer.Option(
        min=1, help="per problem; pass@k uses k=samples [default: 1]")] = None,
    temperature: Annotated[Optional[float], typer.Option(
        min=0.0, help="0 = greedy [default: 0]")] = None,
    top_p: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="[default: 1]")] = None,
    max_turns: Annotated[Optional[int], typer.Option(min=1, help="[default: 4]")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(
        min=1, help="per turn [default: 256]")] = None,
    max_total_tokens: Annotated[Optional[int], typer.Option(
        help="per episode (default: max(2048, 2 x max-new-tokens))")] = None,
    batch: Annotated[int, typer.Option(min=1, help="episodes rolled out together")] = 8,
    seed: Annotated[Optional[int], typer.Option(help="[default: 0]")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="benchmark files (TIR_DATA_DIR)")] = None,
    merge: Annotated[list[Path], typer.Option(
        help="a leaderboard dir from another machine or run (same protocol) to merge in; "
             "repeatable")] = [],  # noqa: B006
    out: Annotated[Path, typer.Option(help="results dir; rerun to resume")] = Path("leaderboard"),
    title: str = "TIR leaderboard",
    threads: Annotated[Optional[int], typer.Option(min=1, help=THREADS_HELP)] = None,
    verbose: bool = False,
) -> None:
    """Evaluate models x benchmarks under one protocol; resumable; JSON, Markdown, plot, HTML."""
    _setup(verbose, threads)
    from algos.evaluation.leaderboard import (
        DEFAULT_BENCHMARKS,
        LeaderboardConfig,
        ModelSpec,
        SetupError,
        parse_limit,
        run_leaderboard,
    )

    try:
        if (endpoint is None) != (endpoint_model is None):
            raise ValueError("--endpoint and --endpoint-model go together")
        specs = [ModelSpec.parse(m) for m in model]
        if endpoint:
            specs.append(ModelSpec.for_endpoint(endpoint, endpoint_model,
                                                tokenizer=endpoint_tokenizer))
        chosen = {"samples": samples, "temperature": temperature, "top_p": top_p,
                  "max_turns": max_turns, "max_new_tokens": max_new_tokens,
                  "max_total_tokens": max_total_tokens, "seed": seed}
        settings = {
            "benchmarks": tuple(benchmarks.split(",")) if benchmarks else DEFAULT_BENCHMARKS,
            "limit": parse_limit(limit), "batch": batch,
            "data_dir": str(data_dir) if data_dir else None,
            **{k: v for k, v in chosen.items() if v is not None},
        }
        config = (LeaderboardConfig.from_preset(protocol, **settings) if protocol
                  else LeaderboardConfig(**settings))
    except (KeyError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from None
    try:
        results = run_leaderboard(specs or [ModelSpec.parse(DEFAULT_MODEL)], config, out,
                                  title=title, merge=merge)
    except SetupError as exc:
        raise typer.BadParameter(str(exc)) from None
    typer.echo((out / "leaderboard.md").read_text())
    typer.echo(f"results: {out / 'results.json'}  page: {out / 'index.html'}"
               + ("" if results["complete"] else "  (incomplete: rerun to finish)"))


data_app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                       help="Inspect problem files and benchmarks.")
app.add_typer(data_app, name="data")


@data_app.command("check")
def data_check(
    source: Annotated[str, typer.Argument(help="a jsonl/parquet file or a benchmark name")],
    data_dir: Annotated[Optional[Path], typer.Option(help="benchmark dir (default: "
                                                          "$TIR_DATA_DIR)")] = None,
    show_all: Annotated[bool, typer.Option("--all", help="list every problem")] = False,
    verbose: bool = False,
) -> None:
    """Show how a file or benchmark is read: fields, prompts, gold answers, problem ids."""
    _setup(verbose, None)
    from tir_envs.data_check import check_source
    from tir_envs.protocol import render_prompt

    try:
        report = check_source(source, data_dir)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        typer.echo(f"refused: {exc}", err=True)
        raise typer.Exit(1) from None
    fields, problems = report.fields, report.problems
    typer.echo(f"{report.source}: {len(problems)} problems")
    typer.echo(f"fields: question={'+'.join(fields.question)} answer={fields.answer} "
               f"({fields.answer_extractor.__name__}) id={fields.id or '(row number)'}")
    typer.echo("\nprompts (the user turn; the system prompt is the protocol's, the same for all):")
    for problem in problems[:3]:
        prompt = render_prompt(problem.question, system_prompt=None)
        typer.echo(f"\n--- {problem.id}  gold: {problem.answer}\n{prompt}")
    typer.echo(f"gold answers: {report.parsed}/{len(problems)} parse, "
               f"{report.self_graded}/{len(problems)} self-grade")
    for problem_id, reason in report.gold_failures.items():
        typer.echo(f"  {problem_id}: {reason}")
    count = len(problems)
    shown = range(count) if show_all or count <= 20 else [*range(10), *range(count - 5, count)]
    typer.echo(f"\nproblems ({'all' if len(shown) == count else 'first 10 and last 5; --all'}):")
    for index in shown:
        problem = problems[index]
        typer.echo(f"  {index:>5}  {problem.id:<36} {problem.answer[:24]:<24} "
                   f"{problem.question[:60]!r}")


if __name__ == "__main__":  # torchrun runs `python -m algos.cli`
    app()
