"""What ``tir data check`` reports: is a problem file or benchmark read right before anyone trains
or publishes on it?

A file that loads can still be wrong: the question without its story, a list answer as a Python
repr, a gold ``13 (pictures)`` that a correct ``\\boxed{13}`` never matches. ``check_source``
loads a file or benchmark the way the env does and puts every gold answer through the grader.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from tir_envs import data
from tir_envs.data import FieldMap, Problem
from tir_envs.grading import Grader, grade

# A number, then words only: a unit or annotation (``13 (pictures)``, ``45 minutes``, ``3 km/h``).
_NUMBER_AND_WORDS = re.compile(r"\s*([+-]?\d[\d,]*(?:\.\d+)?)\s*(\(?[A-Za-z]{2,}[A-Za-z .'/-]*\)?)")


@dataclass
class SourceCheck:
    """One file's or benchmark's report; ``gold_failures`` maps problem id -> reason."""

    source: str
    fields: FieldMap
    problems: list[Problem]
    parsed: int = 0
    """Gold answers math-verify reads as math equal to themselves (or the string layer settles)."""
    gold_failures: dict[str, str] = field(default_factory=dict)

    @property
    def self_graded(self) -> int:
        return len(self.problems) - len(self.gold_failures)


def gold_failure(answer: str, parser: Grader) -> tuple[bool, str | None]:
    """``(parses, why it fails to self-grade or None)`` for one gold answer.

    Self-grading means the gold, boxed as a model would write it, grades equal to itself; and a
    gold that is a number trailed by words (a unit, an annotation) is also matched by that number
    alone, the answer a correct model would give.
    """
    parses = parser.judge(answer, answer).correct
    suspect = data.suspect_gold(answer)
    if suspect:
        return parses, suspect
    if not grade(f"\\boxed{{{answer}}}", answer):
        return parses, f"{answer!r} does not grade equal to itself"
    unit = _NUMBER_AND_WORDS.fullmatch(answer)
    if unit and not grade(unit[1], answer):
        return parses, f"a boxed {unit[1]} grades wrong against {answer!r}"
    return parses, None


def check_source(source: str | Path, data_dir: str | Path | None = None) -> SourceCheck:
    """Load a file (any layout ``load_file`` reads) or a benchmark name, and grade its golds."""
    path = Path(source)
    if path.suffix or path.exists():
        records = data.read_records(path)
        if not records:
            raise ValueError(f"no problems in {path}")
        fields = data.detect_fields(list(records[0]), records=records)
        problems = data.load_file(path)
    else:
        spec = data.benchmark_spec(str(source))
        fields = spec.fields
        problems = data.load_benchmark(spec.name, data_dir)
    report = SourceCheck(str(source), fields, problems)
    with Grader(use_string_layer=False) as parser:
        for problem in problems:
            parses, failure = gold_failure(problem.answer, parser)
            report.parsed += parses
            if failure:
                report.gold_failures[problem.id] = failure
    return report
