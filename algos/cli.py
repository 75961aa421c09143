"""The ``tir`` command: ``tir train``, ``tir eval``.

Configs: ``--config run.toml`` (top-level keys are the algorithm's config fields, a ``[rollout]``
table the rollout's) and repeatable ``--set key=value`` overrides (``--set lr=1e-5``,
``--set rollout.max_new_tokens=128``), applied in that order over the algorithm's defaults.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import resource
import time
import tomllib
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from algos.leaderboard import DEFAULT_BENCHMARKS
from algos.models import DEFAULT_MODEL

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  pretty_exceptions_show_locals=False,
                  help="tir-gym: train and evaluate language models on TIR environments.")
logger = logging.getLogger("tir")

# The main job's defaults: sized so `make train` finishes in about 15 minutes on 2 CPU cores.
MAIN_JOB = {
    "prompts_per_iteration": 4,
    "group_size": 4,
    "minibatch_size": 8,
    "grad_accum_steps": 4,
    "lr": 2e-6,
    "rollout.max_new_tokens": 128,
    "rollout.max_turns": 3,
    "rollout.max_total_tokens": 1024,
    "rollout.temperature": 0.8,
}


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


def _setup(verbose: bool, threads: Optional[int] = None) -> None:
    """Logging for the command, and torch's thread count: OpenMP threads that compete with other
    processes for cores spin and stall (measured 5-8x slower generation at 2 threads on a busy
    2-core machine)."""
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


@app.command()
def train(
    algo: Annotated[str, typer.Option(help="gtpo | grpo | ppo, or any registered algorithm")] = "gtpo",
    env: Annotated[str, typer.Option(help="a registered TIR env id")] = "TIR-Math-v0",
    model: Annotated[str, typer.Option(help="HF model dir, .gguf file or hub id")] = DEFAULT_MODEL,
    iterations: Annotated[int, typer.Option(min=0)] = 6,
    config: Annotated[Optional[Path], typer.Option(help="TOML config file")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="override: key=value")] = [],  # noqa: B006
    run_dir: Annotated[Optional[Path], typer.Option(help="default: runs/<algo>-<env>")] = None,
    resume: Annotated[bool, typer.Option(help="continue from run_dir's last checkpoint")] = False,
    eval_problems: Annotated[int, typer.Option(min=0, help="held-out problems before/after")] = 16,
    data_dir: Annotated[Optional[Path], typer.Option(help="benchmark files (TIR_DATA_DIR)")] = None,
    main_job_defaults: Annotated[bool, typer.Option(help="CPU-sized defaults")] = True,
    threads: Annotated[Optional[int], typer.Option(min=1, help=THREADS_HELP)] = None,
    progress: bool = True,
    verbose: bool = False,
) -> None:
    """Train a model with an RL algorithm on a TIR env; report held-out accuracy before and after."""
    _setup(verbose, threads)
    import algos

    defaults = MAIN_JOB if main_job_defaults else {}
    algo_config, rollout = build_configs(algo, config, set_, defaults)
    run_dir = run_dir or Path("runs") / f"{algo}-{env}"
    if run_dir.exists() and not resume and any(run_dir.iterdir()):
        raise typer.BadParameter(f"{run_dir} exists; pass --resume to continue it or another --run-dir")
    env_kwargs = {"data_dir": str(data_dir)} if data_dir else {}
    started = time.perf_counter()
    try:
        agent = algos.make(algo, model, env, algo_config, rollout=rollout, run_dir=run_dir,
                           env_kwargs=env_kwargs)
    except (ValueError, TypeError, OSError) as exc:
        raise typer.BadParameter(str(exc)) from None
    run_dir.mkdir(parents=True, exist_ok=True)
    with agent:
        resumed = resume and agent.resume()
        report: dict[str, Any] = {"algo": algo, "env": env, "model": model,
                                  "config": algo_config.to_dict(),
                                  "rollout": dataclasses.asdict(rollout)}
        before_path = run_dir / "eval_before.json"
        if eval_problems and before_path.exists():
            report["before"] = json.loads(before_path.read_text())
        elif eval_problems:
            typer.echo(f"evaluating on {eval_problems} held-out problems (before training)")
            report["before"] = agent.evaluate(n=eval_problems)
            before_path.write_text(json.dumps(report["before"], indent=2))
        typer.echo(f"training {algo} for {iterations} iterations" +
                   (f" (resumed at {agent.iteration})" if resumed else ""))
        agent.learn(iterations, progress=progress)
        final = agent.save(run_dir / "final")
        if eval_problems:
            report["after"] = agent.evaluate(n=eval_problems)
    from algos.metrics import plot_curves

    curves = plot_curves(run_dir) if (run_dir / "metrics.jsonl").exists() else None
    report["peak_memory_gib"] = round(peak_memory_gib(), 2)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    typer.echo("")
    typer.echo(f"== {algo} on {env} with {model}")
    for when in ("before", "after"):
        if when in report:
            r = report[when]
            typer.echo(f"{when:>6}: pass@1 {r['pass@1']:.3f} on {r['problems']} held-out problems, "
                       f"tool-call rate {r['tool_call_rate']:.2f}, mean turns {r['mean_turns']:.2f}")
    typer.echo(f"model: {final}  curves: {curves}  metrics: {run_dir / 'metrics.jsonl'}")
    typer.echo(f"peak memory {report['peak_memory_gib']} GiB, wall time {report['wall_s']} s")


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
    threads: Annotated[Optional[int], typer.Option(min=1, help=THREADS_HELP)] = None,
) -> None:
    """Evaluate a model on a TIR env under the common protocol."""
    _setup(False, threads)
    from algos.evaluation import evaluate_problems, heldout_problems, problem_source, summarize
    from algos.generation.base import SamplingParams
    from algos.generation.hf import HFGenerator
    from algos.models import load_policy
    from algos.rollout import RolloutConfig, make_vec_env

    rollout = RolloutConfig(max_new_tokens=max_new_tokens, max_turns=max_turns,
                            max_total_tokens=max(2048, 2 * max_new_tokens),
                            temperature=temperature)
    try:
        policy, tokenizer = load_policy(model)
    except (ValueError, OSError) as exc:
        raise typer.BadParameter(str(exc)) from None
    env_kwargs = {"data_dir": str(data_dir)} if data_dir else {}
    vec_env, sandbox = make_vec_env(env, batch, tokenizer, rollout, env_kwargs)
    try:
        problems = heldout_problems(problem_source(vec_env), limit)
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                stop=rollout.stop, seed=seed)
        records = evaluate_problems(vec_env, HFGenerator(policy, tokenizer), tokenizer, problems,
                                    params, samples=samples,
                                    max_total_tokens=rollout.max_total_tokens)
    finally:
        vec_env.close()
        sandbox.close()
    summary = summarize(records)
    summary.update(model=model, env=env, temperature=temperature)
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
    benchmarks: Annotated[str, typer.Option(help="comma list")] = ",".join(DEFAULT_BENCHMARKS),
    limit: Annotated[Optional[str], typer.Option(
        help="first N problems of each benchmark, or gsm8k=200,math500=100 (default: all)")] = None,
    samples: Annotated[int, typer.Option(min=1, help="per problem; pass@k uses k=samples")] = 1,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    max_turns: Annotated[int, typer.Option(min=1)] = 4,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="per turn")] = 256,
    max_total_tokens: Annotated[Optional[int], typer.Option(
        help="per episode (default: max(2048, 2 x max-new-tokens))")] = None,
    batch: Annotated[int, typer.Option(min=1, help="episodes rolled out together")] = 8,
    seed: int = 0,
    data_dir: Annotated[Optional[Path], typer.Option(help="benchmark files (TIR_DATA_DIR)")] = None,
    out: Annotated[Path, typer.Option(help="results dir; rerun to resume")] = Path("leaderboard"),
    title: str = "TIR leaderboard",
    threads: Annotated[Optional[int], typer.Option(min=1, help=THREADS_HELP)] = None,
    verbose: bool = False,
) -> None:
    """Evaluate models x benchmarks under one protocol; resumable; JSON, Markdown, plot, HTML."""
    _setup(verbose, threads)
    from algos.leaderboard import (
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
        config = LeaderboardConfig(
            benchmarks=tuple(benchmarks.split(",")), limit=parse_limit(limit), samples=samples,
            temperature=temperature, top_p=top_p, max_turns=max_turns,
            max_new_tokens=max_new_tokens, max_total_tokens=max_total_tokens, batch=batch,
            seed=seed, data_dir=str(data_dir) if data_dir else None,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    try:
        results = run_leaderboard(specs or [ModelSpec.parse(DEFAULT_MODEL)], config, out,
                                  title=title)
    except SetupError as exc:
        raise typer.BadParameter(str(exc)) from None
    typer.echo((out / "leaderboard.md").read_text())
    typer.echo(f"results: {out / 'results.json'}  page: {out / 'index.html'}"
               + ("" if results["complete"] else "  (incomplete: rerun to finish)"))


def main() -> None:  # pragma: no cover - console entry point
    app()
