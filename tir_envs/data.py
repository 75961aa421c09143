"""Problem sources: benchmark files by name, any jsonl/parquet file, and the Hugging Face hub.

Every source yields ``Problem`` records with the gold answer already reduced to the short string
the grader compares against (GSM8K ``"... #### 72"`` -> ``"72"``, SVAMP ``5.0`` -> ``"5"``,
MATH-500 LaTeX kept as written). ``ProblemSet`` gives the env index/id lookup (GRPO groups pin one
problem) and seeded sampling.

Benchmark files are looked up in ``data_dir`` or ``$TIR_DATA_DIR`` as ``<name>.jsonl``,
``<name>/test.jsonl`` (the Qwen2.5-Math evaluation suite's layout) or the same as parquet; when
none exists the hub is tried if the optional ``datasets`` package (the ``hub`` extra) is installed.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

from tir_envs.protocol import last_boxed
from tir_envs.registry import Registry

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "TIR_DATA_DIR"


@dataclass(frozen=True)
class Problem:
    """One math problem; only ``question`` is ever shown to the model."""

    id: str
    """Unique within its source, e.g. ``math500/test/precalculus/807.json``, ``gsm8k/17``."""
    question: str
    answer: str
    """Gold answer as a short string ready for ``grading.grade``."""
    source: str
    """``math500`` | ``aime24`` | ``amc23`` | ``gsm8k`` | ``svamp`` | ``procedural`` | ``file``."""
    meta: dict = field(default_factory=dict, hash=False)
    """Subject, level, reference solution...: for analysis, never shown to the model."""


# ----------------------------------------------------------------------------------------------
# Answer extraction
# ----------------------------------------------------------------------------------------------


def canonical_number(value: Any) -> str:
    """A number as its shortest exact string (``5.0`` -> ``"5"``, ``"033"`` -> ``"33"``).

    Thousands commas go (``"2,125"`` -> ``"2125"``); strings that are not plain numbers come back
    stripped but otherwise unchanged.
    """
    if isinstance(value, int):  # bools included: str(True) is as good as anything
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    text = str(value).strip()
    plain = text.replace(",", "") if re.fullmatch(r"[+-]?\d{1,3}(,\d{3})+(\.\d+)?", text) else text
    if re.fullmatch(r"[+-]?\d+", plain):
        return str(int(plain))
    if re.fullmatch(r"[+-]?\d*\.\d+", plain):
        return canonical_number(float(plain)) if float(plain).is_integer() else plain
    return text


def answer_after_hashes(value: Any) -> str:
    """GSM8K style: the worked solution ends with ``#### <answer>``."""
    text = str(value)
    if "####" not in text:
        raise ValueError(f"no '####' answer marker in {text[:80]!r}")
    return canonical_number(text.rsplit("####", 1)[1].strip())


def answer_from_solution(value: Any) -> str:
    """MATH style: the answer is the last ``\\boxed{}`` of a worked solution."""
    boxed = last_boxed(str(value))
    if boxed is None:
        raise ValueError(f"no \\boxed{{}} answer in solution {str(value)[:80]!r}")
    return boxed.strip()


def latex_answer(value: Any) -> str:
    """A LaTeX answer as written (MATH-500): ``58,500`` or ``1,-2`` are the grader's business."""
    return str(value).strip()



# ``13 (pictures)``, ``95 (species of insects)``: ASDiv's answers name what was counted.
_ANNOTATED_NUMBER = re.compile(r"([+-]?[\d.,/:]*\d)\s*(?:\([^()]*\))?")


def without_annotations(value: Any) -> str:
    """ASDiv style: ``13 (pictures)`` -> ``13``; ``9 (apples); 3 (pears)`` -> ``9, 3``.

    The grader reads a bracketed word as part of the answer, so a correct ``\\boxed{13}`` would
    grade wrong against the annotated gold. Text answers (``Mrs. Hilt``) come back unchanged.
    """
    text = str(value).strip()
    parts = [_ANNOTATED_NUMBER.fullmatch(part.strip()) for part in text.split(";")]
    if not all(parts):
        return text
    return ", ".join(canonical_number(match[1]) for match in parts)


def auto_answer(value: Any) -> str:
    """Answer of any schema: a number, ``#### n``, a boxed solution, a list, or the text.

    A list (OlympiadBench's ``final_answer``: ``["-3,0"]``, ``["1", "2"]``) becomes its items
    joined by ``", "``, which the grader compares as an unordered set of answers. ``$``
    delimiters go (CollegeMath's ``$10-4 n$``); annotations too (``13 (pictures)`` -> ``13``).
    """
    if isinstance(value, (list, tuple)):
        items = [auto_answer(item) for item in value if item is not None and str(item).strip()]
        if not items:
            raise ValueError("empty answer list")
        return ", ".join(items)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return canonical_number(value)
    text = str(value)
    if "####" in text:
        return answer_after_hashes(text)
    if "\\boxed" in text or "\\fbox" in text:
        return answer_from_solution(text)
    return canonical_number(without_annotations(re.sub(r"(?<!\\)\$", "", text)))


# ----------------------------------------------------------------------------------------------
# Record -> Problem
# ----------------------------------------------------------------------------------------------


def _join_sentences(first: str, second: str) -> str:
    """SVAMP splits the story (``Body``) from the question; many bodies lack a final period."""
    first, second = first.strip(), second.strip()
    if not first:
        return second
    separator = " " if first[-1] in ".!?:;," else ". "
    return f"{first}{separator}{second}"


@dataclass(frozen=True)
class FieldMap:
    """Where a schema keeps question, answer and id; ``question`` may name two fields to join."""

    question: tuple[str, ...]
    answer: str
    id: str | None = None
    answer_extractor: Callable[[Any], str] = auto_answer
    meta: tuple[str, ...] = ()

    def to_problem(self, record: Mapping[str, Any], index: int, source: str) -> Problem:
        missing = [name for name in (*self.question, self.answer) if name not in record]
        if missing:
            raise KeyError(f"record {index} has no field(s) {missing}; it has {sorted(record)}")
        # OlympiadBench's ``context`` is null when the problem stands alone.
        parts = [str(record[n]) for n in self.question if record[n] is not None]
        question = functools.reduce(_join_sentences, parts, "")
        raw_id = record.get(self.id) if self.id else None
        local_id = str(raw_id) if raw_id is not None else str(index)
        try:
            if record[self.answer] is None or not str(record[self.answer]).strip():
                raise ValueError(f"empty {self.answer!r}")
            answer = self.answer_extractor(record[self.answer])
        except ValueError as exc:
            raise ValueError(f"record {index} ({source}/{local_id}): {exc}") from exc
        meta = {name: record[name] for name in self.meta if name in record}
        return Problem(
            id=f"{source}/{local_id}", question=question, answer=answer, source=source, meta=meta
        )


# Field names of the common layouts (matched in any letter case), in order of preference.
_CONTEXTS = ("body", "context")
"""Story fields that come before the question (ASDiv, SVAMP, OlympiadBench): dropping them
loses the numbers the question asks about."""
_QUESTIONS = ("problem", "question", "prompt", "input")
_ANSWERS = ("final_answer", "answer", "target", "gold")
_SOLUTIONS = ("solution",)
"""Worked solutions: only used when there is no short answer; their last ``\\boxed{}`` is read."""
_KNOWN_IDS = ("id", "unique_id", "problem_id", "idx")


def _pick(
    role: str, names: Sequence[str], by_lower: Mapping[str, list[str]], records: Sequence[Mapping]
) -> str | None:
    """The one field playing ``role``; several candidates must agree on every record."""
    candidates = [column for name in names for column in by_lower.get(name, ())]
    if len(candidates) > 1 and any(
        len({json.dumps(r.get(c), sort_keys=True, default=str) for c in candidates}) > 1
        for r in records
    ):
        raise ValueError(
            f"ambiguous layout: the {role} could be any of {candidates} and they differ; "
            f"name it (e.g. {role}_field={candidates[0]!r})"
        )
    return candidates[0] if candidates else None


def detect_fields(
    columns: Iterable[str],
    *,
    records: Sequence[Mapping[str, Any]] = (),
    question_field: str | None = None,
    answer_field: str | None = None,
    id_field: str | None = None,
) -> FieldMap:
    """The ``FieldMap`` for a schema, from explicit names or the common layouts above.

    Names match in any letter case. A story field (``body``/``context``) is joined before the
    question. Two candidates for one role (``question`` and ``prompt``) are refused unless they
    hold the same values in ``records``, so a file is read right or not at all.
    """
    columns = list(columns)
    by_lower: dict[str, list[str]] = {}
    for column in columns:
        by_lower.setdefault(column.lower(), []).append(column)
    if question_field is not None:
        question: tuple[str, ...] | None = tuple(question_field.split("+"))
    else:
        asked = _pick("question", _QUESTIONS, by_lower, records)
        context = _pick("context", _CONTEXTS, by_lower, records)
        question = (context, asked) if context and asked else (asked,) if asked else None
    if answer_field is not None:
        answer: tuple[str, Callable[[Any], str]] | None = (
            answer_field,
            answer_from_solution if answer_field.lower() in _SOLUTIONS else auto_answer,
        )
    else:
        short = _pick("answer", _ANSWERS, by_lower, records)
        solution = _pick("solution", _SOLUTIONS, by_lower, records)
        answer = (
            (short, auto_answer)
            if short
            else (solution, answer_from_solution)
            if solution
            else None
        )
    if question is None or answer is None:
        raise ValueError(
            f"cannot tell which fields hold the question and the answer among {columns}; "
            "pass question_field= and answer_field= (question_field may be 'Body+Question')"
        )
    for name in (*question, answer[0]):
        if name not in columns:
            raise ValueError(f"field {name!r} not in the file's fields {columns}")
    ident = id_field
    if ident is None:
        ident = next((c for name in _KNOWN_IDS for c in by_lower.get(name, ())), None)
    if ident is not None and ident not in columns:
        raise ValueError(f"id field {ident!r} not in the file's fields {columns}")
    used = {*question, answer[0], ident}
    meta = tuple(c for c in columns if c not in used)
    return FieldMap(question, answer[0], ident, answer[1], meta)


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``.jsonl`` (or ``.json`` list) or ``.parquet`` file as dicts."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"problem file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if suffix in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8")
        if suffix == ".json" and text.lstrip().startswith("["):
            return list(json.loads(text))
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
        return records
    raise ValueError(f"unsupported problem file type {suffix!r} ({path}); use .jsonl or .parquet")


def _problems_from_records(
    records: Sequence[Mapping[str, Any]], fields: FieldMap, source: str
) -> list[Problem]:
    problems = [fields.to_problem(record, index, source) for index, record in enumerate(records)]
    _check_unique_ids(problems)
    return problems


def _check_unique_ids(problems: Sequence[Problem]) -> None:
    seen: set[str] = set()
    for problem in problems:
        if problem.id in seen:
            raise ValueError(f"duplicate problem id {problem.id!r}; pass a unique id_field")
        seen.add(problem.id)


def load_file(
    path: str | Path,
    *,
    question_field: str | None = None,
    answer_field: str | None = None,
    id_field: str | None = None,
    source: str = "file",
) -> list[Problem]:
    """Problems from a user's jsonl/parquet file; fields are auto-detected unless named.

    Auto-detection (any letter case): question in ``problem`` / ``question`` / ``prompt`` /
    ``input``, joined after ``body`` / ``context`` when present; answer in ``final_answer`` /
    ``answer`` / ``target`` / ``gold`` (numbers, ``#### n``, boxed solutions, lists and
    ``13 (pictures)`` annotations are reduced), else the last ``\\boxed{}`` of ``solution``; id in
    ``id`` / ``unique_id`` / ``problem_id`` / ``idx``, else the row number. An ambiguous layout
    is refused with the candidate fields named. ``question_field="Body+Question"`` joins two
    fields. Gold answers the grader would misread are logged as a warning (``tir data check``
    lists them).
    """
    records = read_records(path)
    if not records:
        raise ValueError(f"no problems in {path}")
    fields = detect_fields(
        list(records[0]),
        records=records,
        question_field=question_field,
        answer_field=answer_field,
        id_field=id_field,
    )
    problems = _problems_from_records(records, fields, source)
    suspects = suspect_golds(problems)
    if suspects:
        example = next(iter(suspects.items()))
        logger.warning(
            "%d of %d gold answers in %s may not grade as intended (e.g. %s: %s); "
            "run `tir data check %s`",
            len(suspects), len(problems), path, *example, path,
        )
    return problems


_SUSPECT_GOLDS = (
    (re.compile(r"\[\s*['\"].*['\"]\s*\]"), "is a Python list repr"),
    (re.compile(r"[+-]?[\d.,]*\d\s*\([A-Za-z][^()]*\)"), "carries a bracketed annotation"),
    (re.compile(r"None|nan|null", re.IGNORECASE), "is empty"),
)


def suspect_gold(answer: str) -> str | None:
    """Why a gold answer would make correct model answers grade wrong, if it looks that way."""
    for pattern, reason in _SUSPECT_GOLDS:
        if pattern.fullmatch(answer.strip()):
            return f"{answer!r} {reason}"
    return None


def suspect_golds(problems: Iterable[Problem]) -> dict[str, str]:
    """Problem id -> reason, for every gold answer ``suspect_gold`` flags (cheap: no grader)."""
    reasons = ((problem.id, suspect_gold(problem.answer)) for problem in problems)
    return {problem_id: reason for problem_id, reason in reasons if reason}


# ----------------------------------------------------------------------------------------------
# Benchmarks
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchmarkSpec:
    """How to find one benchmark locally and on the hub, and how to read its records."""

    name: str
    file_stem: str
    hub_id: str
    hub_split: str
    fields: FieldMap
    hub_config: str | None = None
    hub_fields: FieldMap | None = None
    """Field mapping of the hub copy when it differs from the local file's."""
    build: Callable[[], list[Problem]] | None = None
    """A benchmark made in code (no file, no hub): ``load_benchmark`` returns what it builds."""
    env_name: str | None = None
    """The middle of its Gymnasium id when the name's upper case does not read well."""

    @property
    def env_id(self) -> str:
        """Its Gymnasium id: ``math500`` -> ``TIR-MATH500-v0``, ``gsm_hard`` -> ``TIR-GSM-HARD-v0``.
        """
        return f"TIR-{self.env_name or self.name.upper().replace('_', '-')}-v0"


BENCHMARKS: Registry[BenchmarkSpec] = Registry("benchmark")
"""Benchmark name -> spec; each one gets an env id at ``import tir_envs`` (``tir_envs.ENV_IDS``)."""


def register_benchmark(spec: BenchmarkSpec) -> BenchmarkSpec:
    """Make ``spec`` loadable by name (``load_benchmark(spec.name)``)."""
    return BENCHMARKS.register(spec.name, spec)


for _spec in (
    BenchmarkSpec(
        name="math500",
        file_stem="math500",
        hub_id="HuggingFaceH4/MATH-500",
        hub_split="test",
        fields=FieldMap(
            ("problem",), "answer", "unique_id", latex_answer, ("subject", "level", "solution")
        ),
    ),
    BenchmarkSpec(
        name="aime24",
        file_stem="aime24",
        hub_id="HuggingFaceH4/aime_2024",
        hub_split="train",
        fields=FieldMap(
            ("problem",), "answer", "id", canonical_number, ("url", "solution", "year")
        ),
    ),
    BenchmarkSpec(
        name="amc23",
        file_stem="amc23",
        hub_id="math-ai/amc23",
        hub_split="test",
        fields=FieldMap(("question",), "answer", "id", canonical_number, ("url",)),
    ),
    BenchmarkSpec(
        name="gsm8k",
        file_stem="gsm8k",
        hub_id="openai/gsm8k",
        hub_config="main",
        hub_split="test",
        fields=FieldMap(("question",), "answer", "idx", answer_after_hashes),
        # The hub rows have no idx: the row number is the id, matching the local file's idx.
        hub_fields=FieldMap(("question",), "answer", None, answer_after_hashes),
    ),
    BenchmarkSpec(
        name="svamp",
        file_stem="svamp",
        hub_id="ChilleD/SVAMP",
        hub_split="train+test",
        fields=FieldMap(
            ("Body", "Question"), "Answer", "ID", canonical_number, ("Type", "Equation")
        ),
    ),
    # The standard TIR evaluation set beyond the five above, named as in the Qwen2.5-Math
    # evaluation suite's data directory (evaluation/data/<name>/test.jsonl).
    BenchmarkSpec(
        name="aime25",
        file_stem="aime25",
        hub_id="math-ai/aime25",
        hub_split="test",
        fields=FieldMap(("problem",), "answer", "id", canonical_number),
    ),
    BenchmarkSpec(
        name="minerva_math",
        file_stem="minerva_math",
        hub_id="svc-huggingface/minerva-math",
        hub_split="test",
        # Answers are the last \boxed{} of the worked solution, units left outside the box.
        fields=FieldMap(("problem",), "solution", "idx", answer_from_solution, ("type",)),
    ),
    BenchmarkSpec(
        name="olympiadbench",
        file_stem="olympiadbench",
        hub_id="Hothan/OlympiadBench",
        hub_config="OE_TO_maths_en_COMP",  # open-ended, text-only, maths, English
        hub_split="train",
        fields=FieldMap(
            ("context", "question"),
            "final_answer",
            "id",
            auto_answer,
            ("subfield", "answer_type", "is_multiple_answer", "unit", "error", "solution"),
        ),
    ),
    BenchmarkSpec(
        name="college_math",
        file_stem="college_math",
        hub_id="qq8933/College_Math_Test",
        hub_split="train",
        # question_number repeats across textbooks: the row number is the id.
        fields=FieldMap(
            ("question",),
            "answer",
            None,
            auto_answer,
            ("data_source", "question_number", "data_topic"),
        ),
    ),
    BenchmarkSpec(
        name="asdiv",
        file_stem="asdiv",
        hub_id="EleutherAI/asdiv",
        hub_split="validation",
        fields=FieldMap(
            ("body", "question"), "answer", "idx", without_annotations, ("solution_type", "formula")
        ),
        hub_fields=FieldMap(
            ("body", "question"), "answer", None, without_annotations, ("solution_type", "formula")
        ),
    ),
    BenchmarkSpec(
        name="gsm_hard",
        file_stem="gsm_hard",
        hub_id="reasoning-machines/gsm-hard",
        hub_split="train",
        # No id field: the row number, the GSM8K test index the problem was made from.
        fields=FieldMap(("input",), "target", None, canonical_number, ("code",)),
    ),
):
    register_benchmark(_spec)

_ALIASES = {
    "math": "math500",
    "aime": "aime24",
    "aime2024": "aime24",
    "aime2025": "aime25",
    "amc": "amc23",
    "amc2023": "amc23",
    "minerva": "minerva_math",
    "olympiad": "olympiadbench",
    "collegemath": "college_math",
    "gsmhard": "gsm_hard",
}


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name.lower())


def benchmark_spec(name: str) -> BenchmarkSpec:
    """The spec for a benchmark name; accepts ``MATH-500``, ``math_500``, ``GSM-Hard``..."""
    key = _ALIASES.get(_key(name), _key(name))
    return BENCHMARKS.get(next((n for n in BENCHMARKS if _key(n) == _key(key)), key))


def _hub_allowed() -> bool:
    offline = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    return not any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in offline)


def _load_from_hub(spec: BenchmarkSpec) -> list[Problem]:
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(
            "the 'datasets' package is not installed (pip install 'tir-gym[hub]')"
        ) from exc
    dataset = datasets.load_dataset(spec.hub_id, spec.hub_config, split=spec.hub_split)
    records = list(dataset)
    fields = spec.hub_fields or spec.fields
    if records and not all(name in records[0] for name in (*fields.question, fields.answer)):
        # Hub copies get re-uploaded with renamed columns; read them like any user file.
        logger.warning(
            "%s on the hub has fields %s; auto-detecting", spec.hub_id, sorted(records[0])
        )
        fields = detect_fields(records[0], records=records)
    return _problems_from_records(records, fields, spec.name)


def benchmark_paths(spec: BenchmarkSpec, directory: str | Path) -> list[Path]:
    """Where a benchmark's file may be, in order: ``<name>.jsonl``, ``<name>/test.jsonl`` (the
    Qwen2.5-Math evaluation suite's layout), then the same as parquet."""
    return [
        Path(directory) / f"{stem}{suffix}"
        for suffix in (".jsonl", ".parquet")
        for stem in (spec.file_stem, f"{spec.file_stem}/test")
    ]


def load_benchmark(
    name: str, data_dir: str | Path | None = None, *, from_hub: bool | None = None
) -> list[Problem]:
    """The problems of a named benchmark.

    Args:
        name: a registered benchmark (``BENCHMARKS.names()``; spelling variants ok).
        data_dir: directory holding ``<name>.jsonl``, ``<name>/test.jsonl`` or the same as
            parquet; defaults to ``$TIR_DATA_DIR``.
        from_hub: ``True`` loads from the Hugging Face hub only, ``False`` never touches it,
            ``None`` (default) uses a local file when there is one and the hub otherwise (unless
            ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` is set).
    """
    spec = benchmark_spec(name)
    if spec.build is not None:
        return spec.build()
    if from_hub:
        return _load_from_hub(spec)
    directory = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
    tried: list[str] = []
    if directory:
        for path in benchmark_paths(spec, directory):
            if path.is_file():
                return _problems_from_records(read_records(path), spec.fields, spec.name)
            tried.append(str(path))
    where = (
        f"looked for {' and '.join(tried)}"
        if tried
        else f"no data_dir given and ${DATA_DIR_ENV} is unset"
    )
    hub_note = "hub disabled (from_hub=False)"
    if from_hub is None and _hub_allowed():
        try:
            problems = _load_from_hub(spec)
        except Exception as exc:  # noqa: BLE001 - any hub failure becomes part of one clear error
            hub_note = f"hub {spec.hub_id!r} failed: {type(exc).__name__}: {exc}"
        else:
            logger.info("loaded %s from the hub (%s)", spec.name, spec.hub_id)
            return problems
    elif from_hub is None:
        hub_note = "hub disabled (HF offline mode)"
    raise FileNotFoundError(
        f"benchmark {spec.name!r} not found: {where}. Put {spec.file_stem}.jsonl (or "
        f"{spec.file_stem}/test.jsonl, or parquet) in a directory and set {DATA_DIR_ENV} "
        "(or pass data_dir=); "
        f"{hub_note}."
    )


# ----------------------------------------------------------------------------------------------
# ProblemSet
# ----------------------------------------------------------------------------------------------


class ProblemSet(Sequence[Problem]):
    """An ordered, immutable set of problems with lookup by id or index and seeded sampling."""

    def __init__(self, problems: Iterable[Problem]):
        self._problems: tuple[Problem, ...] = tuple(problems)
        if not self._problems:
            raise ValueError("a ProblemSet needs at least one problem")
        _check_unique_ids(self._problems)
        self._index_by_id = {problem.id: i for i, problem in enumerate(self._problems)}

    @classmethod
    def from_benchmark(cls, name: str, data_dir: str | Path | None = None, **kwargs) -> ProblemSet:
        return cls(load_benchmark(name, data_dir, **kwargs))

    @classmethod
    def from_file(cls, path: str | Path, **kwargs) -> ProblemSet:
        return cls(load_file(path, **kwargs))

    def __len__(self) -> int:
        return len(self._problems)

    @overload
    def __getitem__(self, index: int) -> Problem: ...

    @overload
    def __getitem__(self, index: slice) -> ProblemSet: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return ProblemSet(self._problems[index])
        return self._problems[index]

    def __contains__(self, item: object) -> bool:
        if isinstance(item, str):
            return item in self._index_by_id
        return item in self._problems

    def index_of(self, problem_id: str) -> int:
        try:
            return self._index_by_id[problem_id]
        except KeyError:
            examples = ", ".join(repr(p.id) for p in self._problems[:3])
            raise KeyError(
                f"no problem with id {problem_id!r} (ids look like {examples})"
            ) from None

    def get(self, problem_id_or_index: str | int) -> Problem:
        """By id (``"gsm8k/17"``) or by position (``17``, numpy integers too)."""
        if isinstance(problem_id_or_index, str):
            return self._problems[self.index_of(problem_id_or_index)]
        try:
            index = int(problem_id_or_index)  # accepts numpy integers
        except (TypeError, ValueError):
            raise TypeError(
                f"problem ids are str and indices int, got {type(problem_id_or_index).__name__}"
            ) from None
        if not -len(self) <= index < len(self):
            raise IndexError(f"problem index {index} out of range for {len(self)} problems")
        return self._problems[index]

    def sample(self, np_random) -> Problem:
        """A uniform random problem from a ``numpy.random.Generator`` (the env's ``np_random``)."""
        return self._problems[int(np_random.integers(len(self._problems)))]

    @property
    def ids(self) -> list[str]:
        return [problem.id for problem in self._problems]

    def __repr__(self) -> str:
        sources = sorted({problem.source for problem in self._problems})
        return f"ProblemSet({len(self)} problems from {', '.join(sources)})"
