"""Measuring policies, apart from training them.

- ``scoring``: roll a policy out on chosen problems; per-sample records, pass@k, bootstrap
  intervals (what ``tir train`` reports before and after);
- ``leaderboard``: every model on every benchmark under one protocol, resumable;
- ``report``: a leaderboard's Markdown, PNG and HTML, rendered from its results alone;
- ``provenance``: the machine, versions, commit and load that every committed number carries.
"""

from algos.evaluation.scoring import (
    bootstrap_pass1,
    evaluate_problems,
    heldout_problems,
    pass_at_k,
    problem_source,
    sample_record,
    summarize,
)

__all__ = ["bootstrap_pass1", "evaluate_problems", "heldout_problems", "pass_at_k",
           "problem_source", "sample_record", "summarize"]
