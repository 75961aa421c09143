"""``examples/reinforce.py``: an outside algorithm over the public env API runs and updates the
model (a tiny HF model directory, so the script's own ``from_pretrained`` path is exercised)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "reinforce.py"


@pytest.mark.timeout(180)
def test_reinforce_example_trains(tmp_path):
    from transformers import AutoModelForCausalLM

    from algos.tiny import save_tiny

    model_dir = save_tiny(tmp_path / "tiny")
    spec = importlib.util.spec_from_file_location("reinforce_example", SCRIPT)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    model, returns = example.main(["--model", str(model_dir), "--episodes", "2",
                                   "--max-new-tokens", "8", "--lr", "1e-2"])
    assert len(returns) == 2 and all(isinstance(r, float) for r in returns)
    start = AutoModelForCausalLM.from_pretrained(model_dir)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), start.parameters()))
