"""Atomic checkpoints: an HF model directory plus the trainer state a resumed run needs.

Layout under a run directory::

    checkpoints/iter_000012/model/          save_pretrained (+ tokenizer): from_pretrained loads it
    checkpoints/iter_000012/trainer.pt      optimizer, iteration, RNG states, config
    checkpoints/latest                      the name of the newest complete checkpoint

Each checkpoint is written into a temporary sibling directory and renamed into place, and
``latest`` is replaced by rename too, so a run killed at any instant leaves the previous
checkpoint intact and never a half-written one that ``latest`` points to.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

TRAINER_STATE = "trainer.pt"
LATEST = "latest"


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(
    run_dir: str | os.PathLike, iteration: int, model, tokenizer, trainer_state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write checkpoint ``iteration`` atomically; keep the newest ``keep`` of them."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"iter_{iteration:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        model.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        torch.save(trainer_state, tmp / TRAINER_STATE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_atomic(root / LATEST, final.name)
    for old in sorted(p for p in root.glob("iter_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    pointer = checkpoint_root(run_dir) / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / TRAINER_STATE).is_file() else None


def load_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    """The trainer state of checkpoint ``path`` (its weights are in ``path / "model"``)."""
    path = Path(path)
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint (no {TRAINER_STATE})")
    return torch.load(path / TRAINER_STATE, weights_only=False)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
