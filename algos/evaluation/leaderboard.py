"""A leaderboard: every model on every benchmark env under one protocol, resumable.

One protocol means the same prompt, turn limit, token budgets, grader, sandbox limits and sampling
parameters for every model; it is written into the results so a number is never read without it.
Sample ``s`` of a problem is sampled with seed ``seed + s``, as in ``algos.evaluation``.

Resuming: every finished chunk of samples is appended (and fsynced) to ``records.jsonl``, one line
per sample keyed by ``(model, benchmark, problem_id, sample)``. A rerun with the same ``out_dir``
loads the file, drops duplicate keys and a line cut short by a crash, and evaluates only the keys
that are missing, so a killed evaluation loses at most the chunk in flight and counts nothing
twice. ``run.json`` pins the protocol, each model's source (and a hash of a local model's
files) and a hash of each benchmark's problems: a rerun that would mix incompatible samples fails
instead. ``limit`` and ``samples`` may grow between runs (the first N problems by index and
samples 0..K-1 stay the same keys).

Merging: that key is a record's id on every machine, so leaderboard directories made elsewhere
(another CPU box, a GPU run with a vLLM endpoint) under the same protocol and problem files merge
into one table: ``run_leaderboard(..., merge=[other_dir])`` imports the records it lacks, and the
models only those directories evaluated join the table without being loaded here.

Protocols have names (``PROTOCOLS``): ``LeaderboardConfig.from_preset("qwen25-math-tir")`` takes the
settings of the Qwen2.5-Math evaluation suite's tool-integrated runs, so a GPU run's numbers compare
with published ones; the preset's name is recorded with the protocol.

Outputs in ``out_dir``: ``results.json``, ``leaderboard.md``, ``leaderboard.png`` and a
self-contained ``index.html`` (table and plot, the PNG embedded as base64).

    models = [ModelSpec.parse(DEFAULT_MODEL), ModelSpec.parse("gtpo=runs/gtpo/final")]
    results = run_leaderboard(models, LeaderboardConfig(limit=50, samples=4, temperature=0.6), "lb")
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from algos.evaluation.provenance import (
    append_sessions,
    machine_info,
    now,
    read_sessions,
)
from algos.evaluation.report import write_outputs
from algos.evaluation.scoring import heldout_problems, sample_record, summarize
from algos.generation.base import Generator, SamplingParams
from algos.rollout import RolloutConfig, collect, make_vec_env
from algos.warmup import SYSTEM_PROMPT as TRAINING_SYSTEM_PROMPT
from tir_envs.registry import Registry

logger = logging.getLogger(__name__)

DEFAULT_BENCHMARKS = ("gsm8k", "svamp", "math500", "aime24", "amc23")
RECORDS_FILE = "records.jsonl"
RUN_FILE = "run.json"
_METRICS = ("pass@1", "pass@k", "mean_turns", "tool_call_rate", "code_error_rate")
_GENERIC_DIR_NAMES = re.compile(r"^(final|latest|best|model|checkpoint[-_\w]*)$")


def benchmark_envs() -> dict[str, str]:
    """Benchmark name -> its env id (every registered TIR env except the procedural one)."""
    from tir_envs import ENV_IDS

    return {name: env_id for env_id, name in ENV_IDS.items() if name != "procedural"}


def resolve_benchmarks(names: str | Iterable[str]) -> tuple[str, ...]:
    """Canonical benchmark names, in the given order, from a comma list or names (aliases ok)."""
    from tir_envs.data import benchmark_spec

    if isinstance(names, str):
        names = names.split(",")
    envs = benchmark_envs()
    out: list[str] = []
    for raw in (n.strip() for n in names):
        if not raw:
            continue
        try:
            name = benchmark_spec(raw).name
        except KeyError:
            name = None
        if name not in envs:
            raise ValueError(f"unknown benchmark {raw!r}; choose from {', '.join(envs)}")
        if name not in out:
            out.append(name)
    if not out:
        raise ValueError(f"no benchmark given; choose from {', '.join(envs)}")
    return tuple(out)


def parse_limit(text: str | None) -> int | dict[str, int] | None:
    """``"50"`` (every benchmark) or ``"gsm8k=200,math500=100"`` (the rest in full); None = all."""
    if text is None or not text.strip():
        return None
    if "=" not in text:
        return _positive(text, "limit")
    limits = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--limit expects N or name=N,name=N; got {text!r}")
        limits[resolve_benchmarks(name)[0]] = _positive(value, f"limit of {name.strip()}")
    return limits


def _positive(text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{what} must be a positive integer, got {text!r}") from None
    if value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value}")
    return value


@dataclass(frozen=True)
class ModelSpec:
    """One leaderboard entry: a label and where its generations come from."""

    label: str
    source: str
    """HF model directory, ``.gguf`` file or hub id; for an endpoint, the served model name."""
    endpoint: str | None = None
    """Base URL of an OpenAI-compatible server (``http://host:8000/v1``); None = local HF model."""
    tokenizer: str | None = None
    """Endpoint only: the model directory or hub id whose tokenizer renders prompts (the server
    receives token ids). Defaults to ``source``."""
    files_sha256: str | None = None
    """``files_sha256`` of a local model's directory, filled in by ``run_leaderboard``: a
    checkpoint retrained at the same path is another model, not more samples of this one."""

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """``path_or_hub_id`` or ``label=path_or_hub_id``."""
        label, sep, source = text.partition("=")
        if not sep:
            label, source = "", text
        label, source = label.strip(), source.strip()
        if not source:
            raise ValueError(f"model {text!r} names no path or hub id")
        return cls(label or default_label(source), source)

    @classmethod
    def for_endpoint(cls, url: str, model: str, *, tokenizer: str | None = None,
                     label: str | None = None) -> ModelSpec:
        return cls(label or default_label(model), model, url, tokenizer)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source": self.source}
        if self.endpoint:
            out.update(endpoint=self.endpoint, tokenizer=self.tokenizer or self.source)
        if self.files_sha256:
            out["files_sha256"] = self.files_sha256
        return out

    @classmethod
    def from_description(cls, label: str, described: dict[str, Any]) -> ModelSpec:
        return cls(label, described["source"], described.get("endpoint"),
                   described.get("tokenizer"), described.get("files_sha256"))


def files_sha256(model_dir: Path) -> str:
    """sha256 over every file under ``model_dir`` (relative names and contents, in name order):
    weights, config, tokenizer and chat template all decide what the model generates."""
    digest = hashlib.sha256()
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(model_dir).as_posix()}\0".encode())
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def default_label(source: str) -> str:
    """A short label: the hub repo name, or a directory's name (with its parent when the name
    is generic, so ``runs/gtpo/final`` reads ``gtpo/final``)."""
    path = Path(source.rstrip("/"))
    if not path.exists():
        return source.rstrip("/").rsplit("/", 1)[-1]
    if _GENERIC_DIR_NAMES.match(path.name) and path.parent.name:
        return f"{path.parent.name}/{path.name}"
    return path.name


@dataclass(frozen=True)
class ProtocolPreset:
    """A named protocol: the ``LeaderboardConfig`` settings that decide a score, and their source."""

    description: str
    settings: dict[str, Any]


PROTOCOLS: Registry[ProtocolPreset] = Registry("protocol preset")
"""Protocol name -> preset, for ``LeaderboardConfig.from_preset`` and ``tir leaderboard --protocol``."""

QWEN_TIR_SYSTEM_PROMPT = (
    "Please integrate natural language reasoning with programs to solve the problem above, "
    "and put your final answer within \\boxed{}."
)
"""The system message of Qwen2.5-Math's tool-integrated reasoning (its README and eval suite)."""

PROTOCOLS.register("qwen25-math-tir", ProtocolPreset(
    "the Qwen2.5-Math evaluation suite's tool-integrated setting: greedy pass@1 (temperature 0, "
    "one sample), at most 4 model calls (max_func_call), 2048 new tokens per call "
    "(max_tokens_per_call), its TIR system message; the answer is the final turn's \\boxed{}",
    {"samples": 1, "temperature": 0.0, "top_p": 1.0, "max_turns": 4, "max_new_tokens": 2048,
     "max_total_tokens": 16384, "seed": 0,
     "env_kwargs": {"system_prompt": QWEN_TIR_SYSTEM_PROMPT}},
))
PROTOCOLS.register("tir-gym-cpu", ProtocolPreset(
    "the committed CPU leaderboard: the one-line system prompt the project's models train with "
    "(algos.warmup.SYSTEM_PROMPT), 2 samples at temperature 0.6, 3 turns of 192 new tokens, "
    "2048 tokens an episode",
    {"samples": 2, "temperature": 0.6, "top_p": 1.0, "max_turns": 3, "max_new_tokens": 192,
     "max_total_tokens": 2048, "seed": 0, "env_kwargs": {"system_prompt": TRAINING_SYSTEM_PROMPT}},
))


@dataclass
class LeaderboardConfig:
    """What to evaluate and how. Fields marked protocol must match when a run resumes."""

    benchmarks: tuple[str, ...] = DEFAULT_BENCHMARKS
    limit: int | dict[str, int] | None = None
    """First N problems by index of each benchmark (a dict sets it per benchmark); None = all."""
    samples: int = 1
    """Samples per problem: pass@1 is their mean, pass@k uses k = samples."""
    temperature: float = 0.0
    """Protocol. 0 = greedy (then samples > 1 are identical and pass@k says nothing new)."""
    top_p: float = 1.0
    """Protocol."""
    max_turns: int = 4
    """Protocol: assistant turns per episode."""
    max_new_tokens: int = 256
    """Protocol: tokens per turn."""
    max_total_tokens: int | None = None
    """Protocol: tokens per episode (prompt, turns, tool output); None = max(2048, 2 x per turn)."""
    seed: int = 0
    """Protocol: sample ``s`` uses ``seed + s``."""
    batch: int = 8
    """Episodes rolled out together (speed only; with sampling it changes which draws are made)."""
    data_dir: str | None = None
    """Directory of benchmark files; None = ``$TIR_DATA_DIR`` (or the hub when online)."""
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    """Protocol: extra env arguments (e.g. ``exec_timeout_s``, ``system_prompt``)."""
    preset: str | None = None
    """The named protocol these settings came from (``from_preset`` sets it); recorded."""

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> LeaderboardConfig:
        """A preset's settings, then ``overrides``; a protocol setting overridden to another value
        is named in ``preset`` (``"qwen25-math-tir, modified: max_new_tokens"``), so the record
        never claims a protocol it did not follow."""
        settings = copy.deepcopy(PROTOCOLS.get(name).settings)
        changed = sorted(k for k, v in overrides.items() if k in settings and v != settings[k])
        label = f"{name}, modified: {', '.join(changed)}" if changed else name
        return cls(**{**settings, **overrides, "preset": label})

    def __post_init__(self) -> None:
        self.benchmarks = resolve_benchmarks(self.benchmarks)
        if isinstance(self.limit, dict):
            self.limit = {resolve_benchmarks(k)[0]: v for k, v in self.limit.items()}
        if self.samples < 1 or self.batch < 1:
            raise ValueError("samples and batch must be >= 1")
        self.rollout()  # validates the budgets

    def rollout(self) -> RolloutConfig:
        return RolloutConfig(
            max_new_tokens=self.max_new_tokens, max_turns=self.max_turns,
            max_total_tokens=self.max_total_tokens or max(2048, 2 * self.max_new_tokens),
            temperature=self.temperature, top_p=self.top_p,
        )

    def limit_for(self, benchmark: str) -> int | None:
        return self.limit.get(benchmark) if isinstance(self.limit, dict) else self.limit

    def sampling(self, sample: int) -> SamplingParams:
        r = self.rollout()
        return SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                              top_p=r.top_p, stop=r.stop, seed=self.seed + sample)

    def protocol(self) -> dict[str, Any]:
        """Everything that decides a score, read from the env itself where it keeps it."""
        import importlib.metadata

        from tir_envs.env import TIRMathEnv
        from tir_envs.sandbox.base import Limits

        env = TIRMathEnv(**self.env_kwargs)
        try:
            r = self.rollout()
            protocol = {
                "preset": self.preset,
                "system_prompt": env.system_prompt,
                "user_template": env.user_template,
                "chat_template": "each model's own tokenizer chat template",
                "max_turns": r.max_turns,
                "max_new_tokens": r.max_new_tokens,
                "max_total_tokens": r.max_total_tokens,
                "stop": list(r.stop),
                "temperature": r.temperature,
                "top_p": r.top_p,
                "seed": self.seed,
                "grader": "tir_envs.grading (math-verify "
                          f"{importlib.metadata.version('math-verify')})",
                "code_blocks": env.code_blocks,
                "max_output_chars": env.max_output_chars,
                "exec_timeout_s": env.exec_timeout_s or self.env_kwargs.get(
                    "sandbox_kwargs", {}).get("timeout_s", Limits().timeout_s),
                "sandbox": self.env_kwargs.get("sandbox_backend", "local"),
                "reward": dataclasses.asdict(env.reward_fn)
                if dataclasses.is_dataclass(env.reward_fn) else repr(env.reward_fn),
                "env_kwargs": self.env_kwargs,
            }
        finally:
            env.close()
        return json.loads(json.dumps(protocol))  # as it reads back from run.json


@dataclass
class Benchmark:
    """A benchmark as evaluated: its env, the problem ids in the subset, a hash of its problems."""

    name: str
    env_id: str
    problem_ids: list[str]
    total: int
    sha256: str

    def describe(self) -> dict[str, Any]:
        return {"env_id": self.env_id, "problems_evaluated": len(self.problem_ids),
                "problems_total": self.total, "sha256": self.sha256}


def load_benchmarks(config: LeaderboardConfig) -> list[Benchmark]:
    """Read every benchmark up front, so a missing file fails before any model loads."""
    from tir_envs.data import ProblemSet

    if config.data_dir is not None and not Path(config.data_dir).is_dir():
        raise FileNotFoundError(f"data dir {config.data_dir} does not exist or is not a directory")
    envs = benchmark_envs()
    out = []
    for name in config.benchmarks:
        problems = ProblemSet.from_benchmark(name, data_dir=config.data_dir)
        digest = hashlib.sha256()
        for p in problems:
            digest.update(json.dumps([p.id, p.question, p.answer]).encode())
        limit = config.limit_for(name)
        ids = heldout_problems(problems, limit if limit is not None else len(problems))
        out.append(Benchmark(name, envs[name], ids, len(problems), digest.hexdigest()))
    return out


# ---------------------------------------------------------------------------------- records


Key = tuple[str, str, str, int]


def record_key(record: dict) -> Key:
    return (record["model"], record["benchmark"], str(record["problem_id"]), int(record["sample"]))


def load_records(path: str | os.PathLike) -> dict[Key, dict]:
    """Records by key. A line cut short by a crash is skipped; of duplicate keys the first
    scored record wins (a sample that hit a sandbox infra error is replaced by its retry)."""
    path = Path(path)
    records: dict[Key, dict] = {}
    if not path.is_file():
        return records
    broken = duplicates = 0
    with path.open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                key = record_key(record)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                broken += 1
                continue
            if key in records:
                duplicates += 1
                if not (records[key].get("infra_error") and not record.get("infra_error")):
                    continue
            records[key] = record
    if broken or duplicates:
        logger.warning("%s: skipped %d unreadable line(s) and %d duplicate key(s)",
                       path, broken, duplicates)
    return records


class RecordLog:
    """Append-only JSONL of sample records; each chunk is one write, flushed and fsynced."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.appended = 0
        """Records written through this log (this session's count)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a+", encoding="utf-8")
        self._file.seek(0, os.SEEK_END)
        if self._file.tell():  # a crash mid-line must not glue the next record onto it
            self._file.seek(self._file.tell() - 1)
            last = self._file.read(1)
            self._file.seek(0, os.SEEK_END)
            if last != "\n":
                self._file.write("\n")

    def append(self, records: list[dict]) -> None:
        self._file.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
        self._file.flush()
        os.fsync(self._file.fileno())
        self.appended += len(records)

    def close(self) -> None:
        self._file.close()


def _check_run_state(out_dir: Path, protocol: dict, models: list[ModelSpec],
                     benchmarks: list[Benchmark]) -> None:
    """Refuse to mix samples made under another protocol, model or problem set; then record
    this run's (the union of all runs in ``out_dir``)."""
    path = out_dir / RUN_FILE
    state = json.loads(path.read_text()) if path.is_file() else {}
    _check_compatible(state, str(out_dir), protocol, {s.label: s.describe() for s in models},
                      {b.name: b.sha256 for b in benchmarks})
    known = state.get("models", {})
    for spec in models:
        if spec.files_sha256 and spec.label in known and "files_sha256" not in known[spec.label]:
            logger.warning("%s: %s predates model hashes; its earlier samples of %r are "
                           "trusted to be of these files", spec.label, path, spec.source)
    state = {
        "protocol": protocol,
        "models": _union_models(known, {s.label: s.describe() for s in models}),
        "benchmarks": {**state.get("benchmarks", {}),
                       **{b.name: {"env_id": b.env_id, "sha256": b.sha256} for b in benchmarks}},
    }
    _write_run_state(out_dir, state)


def _write_run_state(out_dir: Path, state: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = (out_dir / RUN_FILE).with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, out_dir / RUN_FILE)


def _check_compatible(state: dict, where: str, protocol: dict, models: dict[str, dict],
                      benchmarks: dict[str, str]) -> None:
    """Refuse samples made under another protocol (its preset's name aside: the settings are
    what count), a label naming another model, or a benchmark read from another file."""
    old = state.get("protocol")
    if old is not None:
        diff = sorted(k for k in set(old) | set(protocol)
                      if k != "preset" and old.get(k) != protocol.get(k))
        if diff:
            raise ValueError(
                f"{where} holds samples made under another protocol (differs in "
                f"{', '.join(diff)}); use another --out, or the same settings to resume"
            )
    known_models = state.get("models", {})
    for label, described in models.items():
        if label in known_models and not _same_model(known_models[label], described):
            raise ValueError(
                f"label {label!r} in {where} was {known_models[label]}, now {described}; "
                "give this model another label (label=path)"
            )
    known_benchmarks = state.get("benchmarks", {})
    for name, sha256 in benchmarks.items():
        if name in known_benchmarks and known_benchmarks[name]["sha256"] != sha256:
            raise ValueError(
                f"{name} in {where} was evaluated on a different problem file "
                "(its problems' hash changed); use another --out"
            )


def _same_model(old: dict, new: dict) -> bool:
    """Same source, and same files where both sides hashed them (a run.json from before hashes
    were kept, or a model a custom loader builds, has no hash to compare)."""
    if "files_sha256" not in old or "files_sha256" not in new:
        old, new = ({k: v for k, v in d.items() if k != "files_sha256"} for d in (old, new))
    return old == new


def _union_models(base: dict, newer: dict) -> dict:
    """``base``'s models updated by ``newer``'s, keeping a hash that only ``base`` has."""
    return {**base, **{label: {**base.get(label, {}), **d} for label, d in newer.items()}}


def merge_runs(out_dir: Path, sources: Iterable[str | os.PathLike]) -> list[ModelSpec]:
    """Import into ``out_dir`` the records, models and sessions of other leaderboard directories
    made under the same protocol on the same problem files; returns the imported models.

    Records are keyed by id (model, benchmark, problem, sample): one that ``out_dir`` already
    holds scored is kept, so merging twice adds nothing."""
    state = json.loads((out_dir / RUN_FILE).read_text())
    records = load_records(out_dir / RECORDS_FILE)
    log = RecordLog(out_dir / RECORDS_FILE)
    imported: dict[str, dict] = {}
    try:
        for source in map(Path, sources):
            if not (source / RUN_FILE).is_file():
                raise ValueError(f"{source} is not a leaderboard directory (no {RUN_FILE})")
            other = json.loads((source / RUN_FILE).read_text())
            # A label or benchmark only one side knows is fine; one both know must agree.
            _check_compatible(state, str(source), other["protocol"], other.get("models", {}),
                              {n: b["sha256"] for n, b in other.get("benchmarks", {}).items()})
            new = [r for key, r in load_records(source / RECORDS_FILE).items()
                   if not r.get("infra_error")
                   and (key not in records or records[key].get("infra_error"))]
            log.append(new)
            records.update((record_key(r), r) for r in new)
            imported.update(other.get("models", {}))
            state["models"] = _union_models(other.get("models", {}), state["models"])
            state["benchmarks"] = {**other.get("benchmarks", {}), **state["benchmarks"]}
            _merge_sessions(out_dir, source)
            logger.info("merged %d records from %s", len(new), source)
    finally:
        log.close()
    _write_run_state(out_dir, state)
    return [ModelSpec.from_description(label, d) for label, d in imported.items()]


def _merge_sessions(out_dir: Path, source: Path) -> None:
    known = {json.dumps(s, sort_keys=True) for s in read_sessions(out_dir)}
    append_sessions(out_dir, [s for s in read_sessions(source)
                              if json.dumps(s, sort_keys=True) not in known])


# ---------------------------------------------------------------------------------- running


class SetupError(ValueError):
    """The leaderboard cannot start: a user's mistake, reported before any evaluation."""


Loader = Callable[[ModelSpec], tuple[Generator, Any]]
"""Builds ``(generator, tokenizer)`` for a model; the tokenizer renders and tokenizes prompts."""


def load_model(spec: ModelSpec) -> tuple[Generator, Any]:
    """A local model through the ``hf`` backend, or an endpoint through the ``openai`` one."""
    if spec.endpoint:
        from transformers import AutoTokenizer

        from algos.generation.openai import OpenAIGenerator
        from algos.models import resolve_model_dir

        tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(spec.tokenizer or spec.source))
        return OpenAIGenerator(spec.endpoint, spec.source, tokenizer=tokenizer), tokenizer
    from algos.generation import make_generator
    from algos.models import load_policy

    model, tokenizer = load_policy(spec.source)
    return make_generator("hf", model=model, tokenizer=tokenizer), tokenizer


def run_leaderboard(
    models: list[ModelSpec], config: LeaderboardConfig, out_dir: str | os.PathLike, *,
    load: Loader = load_model, title: str = "TIR leaderboard",
    merge: Iterable[str | os.PathLike] = (),
) -> dict[str, Any]:
    """Evaluate what ``out_dir`` does not hold yet, then write every output; returns the results.

    ``merge``: leaderboard directories from other machines or runs, imported first (see the
    module docstring); models only they evaluated join the table and are never loaded here.
    Raises ``SetupError`` before any model loads when a benchmark, data file or model path is
    missing, or ``out_dir`` or a ``merge`` directory holds samples made under another protocol
    or, under a label it knows, of another model (for local files: of other file contents).
    """
    out_dir = Path(out_dir)
    labels = [m.label for m in models]
    if not models or len(set(labels)) != len(labels):
        raise ValueError(f"give at least one model and unique labels; got {labels}")
    if config.samples > 1 and config.temperature == 0:
        logger.warning("samples=%d at temperature 0: greedy samples are identical", config.samples)
    try:
        benchmarks = load_benchmarks(config)
        protocol = config.protocol()
        models = [_pinned(spec, resolve=load is load_model) for spec in models]
        _check_run_state(out_dir, protocol, models, benchmarks)
        merge = list(merge)
        merged = [m for m in merge_runs(out_dir, merge) if m.label not in labels] if merge else []
    except (KeyError, OSError, ValueError) as exc:
        raise SetupError(str(exc)) from exc
    records = load_records(out_dir / RECORDS_FILE)
    started, session_start = time.perf_counter(), now()
    log = RecordLog(out_dir / RECORDS_FILE)
    try:
        for spec in models:
            plan = {b.name: _missing(records, spec, b, config.samples) for b in benchmarks}
            if not any(plan.values()):
                logger.info("%s: all samples already in %s", spec.label, out_dir / RECORDS_FILE)
                continue
            generator, tokenizer = load(spec)
            try:
                for bench in benchmarks:
                    if plan[bench.name]:
                        _evaluate(spec, bench, plan[bench.name], config, generator, tokenizer,
                                  records, log)
            finally:
                generator.close()
    finally:
        log.close()
        _append_session(out_dir, session_start, time.perf_counter() - started, log.appended)
    results = build_results(records, models + merged, benchmarks, config, protocol, title=title,
                            sessions=read_sessions(out_dir))
    write_outputs(results, out_dir)
    return results


def _pinned(spec: ModelSpec, *, resolve: bool) -> ModelSpec:
    """``spec`` with its files' hash when its source is local files. With ``resolve`` a hub id is
    looked up too, so a missing model fails now, not after other models ran."""
    from algos.models import resolve_model_dir

    if spec.endpoint or not (resolve or Path(spec.source).exists()):
        return spec
    return dataclasses.replace(spec, files_sha256=files_sha256(resolve_model_dir(spec.source)))


def _missing(records: dict[Key, dict], spec: ModelSpec, bench: Benchmark,
             samples: int) -> set[Key]:
    """Keys still to evaluate: absent, or hit by a sandbox infra error last time."""
    keys = {(spec.label, bench.name, pid, s) for s in range(samples) for pid in bench.problem_ids}
    return {k for k in keys if k not in records or records[k].get("infra_error")}


def _evaluate(spec: ModelSpec, bench: Benchmark, todo: set[Key], config: LeaderboardConfig,
              generator: Generator, tokenizer, records: dict[Key, dict], log: RecordLog) -> None:
    """Roll out the missing samples chunk by chunk, appending each chunk as it finishes.

    Chunks are fixed slices of the problem list, and a chunk is written only once it is whole, so
    a resumed run batches problems as an uninterrupted one would (and, seeded, makes the same
    samples); only a chunk whose write was torn by the crash is re-batched from what is missing.
    """
    rollout = config.rollout()
    env_kwargs = dict(config.env_kwargs)
    if config.data_dir is not None:
        env_kwargs["data_dir"] = str(config.data_dir)
    width = min(config.batch, len(bench.problem_ids))
    vec_env, sandbox = make_vec_env(bench.env_id, width, tokenizer, rollout, env_kwargs)
    done = 0
    try:
        for s in range(config.samples):
            params = config.sampling(s)
            for start in range(0, len(bench.problem_ids), width):
                chunk = [pid for pid in bench.problem_ids[start : start + width]
                         if (spec.label, bench.name, pid, s) in todo]
                if not chunk:
                    continue
                trajectories = collect(vec_env, generator, tokenizer, chunk, 1, params,
                                       max_total_tokens=rollout.max_total_tokens)
                rows = [{"model": spec.label, "benchmark": bench.name, **sample_record(t, s)}
                        for t in trajectories]
                log.append(rows)
                for row in rows:
                    records[record_key(row)] = row
                done += len(rows)
                logger.info("%s %s sample %d/%d: %d/%d done, %d correct in this chunk",
                            spec.label, bench.name, s + 1, config.samples, done, len(todo),
                            sum(r["correct"] for r in rows))
    finally:
        vec_env.close()
        sandbox.close()


# ---------------------------------------------------------------------------------- results


def cell_metrics(records: list[dict], k: int) -> dict[str, Any]:
    """``summarize`` plus what a leaderboard cell needs: pass@k under one name (k is lowered to
    the fewest scored samples of a problem if infra errors left fewer than k), the standard
    error of pass@1 over problems (the spread a subset of problems brings), the mean generated
    tokens per sample (what the cell cost, and whether answers ran into the budget) and the
    answer rate (how many samples gave a final answer at all: a wrong answer and none differ)."""
    by_problem: dict[str, list[bool]] = {}
    for r in records:
        if not r["infra_error"]:
            by_problem.setdefault(r["problem_id"], []).append(bool(r["correct"]))
    n_min = min((len(v) for v in by_problem.values()), default=0)
    k_eff = min(k, n_min) if n_min else k
    summary = summarize(records, k_eff)
    summary["k"] = k_eff
    summary["pass@k"] = summary.pop(f"pass@{k_eff}") if k_eff > 1 else summary["pass@1"]
    scored = [r for r in records if not r["infra_error"]]
    summary["mean_generated_tokens"] = (float(np.mean([r["generated_tokens"] for r in scored]))
                                        if scored else 0.0)
    summary["answer_rate"] = (float(np.mean([r["final_answer"] is not None for r in scored]))
                              if scored else 0.0)
    per_problem = [np.mean(v) for v in by_problem.values()]
    summary["pass@1_se"] = (float(np.std(per_problem, ddof=1) / np.sqrt(len(per_problem)))
                            if len(per_problem) > 1 else 0.0)
    return summary


def build_results(
    records: dict[Key, dict], models: list[ModelSpec], benchmarks: list[Benchmark],
    config: LeaderboardConfig, protocol: dict, *, title: str = "TIR leaderboard",
    sessions: list[dict] | None = None,
) -> dict[str, Any]:
    """Per model x benchmark metrics, and overall: micro (all samples pooled, so benchmarks
    weigh by their subset size) and macro (the plain mean of the benchmark metrics)."""
    results: dict[str, Any] = {}
    complete = True
    for spec in models:
        cells, pooled = {}, []
        for bench in benchmarks:
            wanted = {(spec.label, bench.name, pid, s)
                      for pid in bench.problem_ids for s in range(config.samples)}
            rows = [records[key] for key in sorted(wanted & records.keys())]
            cell = cell_metrics(rows, config.samples)
            cell["expected_samples"] = len(wanted)
            cell["complete"] = len(rows) == len(wanted) and not cell["infra_errors"]
            complete &= cell["complete"]
            cells[bench.name] = cell
            pooled += [{**r, "problem_id": f"{bench.name}/{r['problem_id']}"} for r in rows]
        micro = cell_metrics(pooled, config.samples)
        macro = {m: float(np.mean([c[m] for c in cells.values()])) for m in _METRICS}
        results[spec.label] = {"benchmarks": cells, "overall_micro": micro, "overall_macro": macro}
    return {
        "title": title,
        "date": now(),
        "machine": machine_info(),
        "protocol": protocol,
        "samples_per_problem": config.samples,
        "k": config.samples,
        "benchmarks": {b.name: {**b.describe(), "limit": config.limit_for(b.name)}
                       for b in benchmarks},
        "models": {s.label: s.describe() for s in models},
        "results": results,
        "complete": complete,
        "records_file": RECORDS_FILE,
        "sessions": sessions or [],
    }


def _append_session(out_dir: Path, started: str, seconds: float, evaluated: int) -> None:
    """One line per run, so the results say when and where their samples were made."""
    append_sessions(out_dir, [{"started": started, "seconds": round(seconds, 1),
                               "samples_evaluated": evaluated, "machine": machine_info()}])
