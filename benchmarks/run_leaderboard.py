"""The committed leaderboard: the default model and trained checkpoints on the five benchmarks.

Every model runs under one protocol (``COMMITTED`` below, recorded in ``results.json``). The
larger benchmarks are evaluated on stated subsets (their first N problems by index), the small
ones in full. The run is resumable: rerun the same command after a crash and it continues.

    python benchmarks/run_leaderboard.py                                  # the default model only
    python benchmarks/run_leaderboard.py gtpo=runs/gtpo/final grpo=runs/grpo/final ppo=runs/ppo/final
    python benchmarks/run_leaderboard.py --smoke                          # a 2-minute end-to-end check

Writes ``benchmarks/results/leaderboard/`` (``results.json``, ``leaderboard.md``,
``leaderboard.png``, ``index.html``, and ``records.jsonl`` with every sample). ``--smoke`` writes
to a temporary directory instead, so a smoke result is never mistaken for the leaderboard.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from algos.evaluation.leaderboard import (
    DEFAULT_BENCHMARKS,
    LeaderboardConfig,
    ModelSpec,
    parse_limit,
    run_leaderboard,
)
from algos.models import DEFAULT_MODEL

logger = logging.getLogger("benchmarks.run_leaderboard")

PRESET = "tir-gym-cpu"
"""The committed protocol (``algos.evaluation.leaderboard.PROTOCOLS``): 2 samples at temperature
0.6, 3 turns of 192 tokens, the main job's scale."""
COMMITTED = {
    "benchmarks": ("tir_math_test", *DEFAULT_BENCHMARKS),
    # Stated subsets sized for one session on 2 shared CPU cores: the first 64 problems of the
    # pinned procedural test set (4 of each of its 16 kinds), the first 16 of GSM8K (of 1,319),
    # SVAMP (of 1,000) and MATH-500, the first 8 of AIME24 (of 30) and AMC23 (of 40), 2 samples
    # each. Raising a limit or the samples later resumes: samples already made are kept.
    "limit": {"tir_math_test": 64, "gsm8k": 16, "svamp": 16, "math500": 16, "aime24": 8,
              "amc23": 8},
}
SMOKE = {
    "benchmarks": ("gsm8k", "svamp"),
    "limit": 2,
    "samples": 1,
    "temperature": 0.0,
    "max_turns": 2,
    "max_new_tokens": 96,
    "max_total_tokens": 2048,
    "seed": 0,
}
DEFAULT_DATA = Path(os.environ.get("TIR_DATA_DIR") or ROOT.parent / "shared/data/benchmarks")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="*", help="label=path of trained model directories")
    parser.add_argument("--no-default-model", action="store_true",
                        help=f"leave out {DEFAULT_MODEL}")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny settings into a temporary dir: checks the pipeline, not models")
    parser.add_argument("--limit", help="override the subsets: N or gsm8k=200,math500=100")
    parser.add_argument("--benchmarks", help="override: comma list")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--merge", type=Path, action="append", default=[],
                        help="a leaderboard dir from another machine or run to merge in")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--batch", type=int, default=16, help="episodes rolled out together")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 on a shared machine: more thrash under load)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    settings = dict(SMOKE if args.smoke else COMMITTED)
    if args.limit:
        settings["limit"] = parse_limit(args.limit)
    if args.benchmarks:
        settings["benchmarks"] = tuple(args.benchmarks.split(","))
    settings.update(batch=args.batch, data_dir=str(args.data_dir))
    config = (LeaderboardConfig(**settings) if args.smoke
              else LeaderboardConfig.from_preset(PRESET, **settings))
    models = [] if args.no_default_model else [ModelSpec.parse(DEFAULT_MODEL)]
    models += [ModelSpec.parse(c) for c in args.checkpoints]
    if args.out:
        out = args.out
    elif args.smoke:
        out = Path(tempfile.gettempdir()) / "tir-leaderboard-smoke"
    else:
        out = ROOT / "benchmarks" / "results" / "leaderboard"
    title = "TIR leaderboard (smoke run: not a result)" if args.smoke else "TIR leaderboard"
    results = run_leaderboard(models, config, out, title=title, merge=args.merge)
    logger.info("wrote %s\n%s", out, (out / "leaderboard.md").read_text())
    return results


if __name__ == "__main__":
    main()
