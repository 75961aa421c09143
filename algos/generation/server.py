"""A vLLM server that training starts, owns and restarts: rollouts go to it over HTTP, and after
each update it reloads the policy from disk.

vLLM runs from its own venv (``scripts/vllm_venv.sh``; it pins its own torch and transformers),
as ``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1 and a free port, with
``VLLM_SERVER_DEV_MODE=1`` (the weight-reload routes) and ``--logprobs-mode processed_logprobs``
(sampling logprobs as ``algos.generation.base`` defines them). The model's own
``generation_config.json`` is ignored (``--generation-config vllm``): its defaults (top-k,
repetition penalty) would change the distribution the trainer thinks it sampled from.

    with VLLMServerGenerator(policy, tokenizer, run_dir / "server-weights") as gen:
        gen.generate(prompts, params)
        ...  # optimizer steps
        gen.update_weights(policy)

A server that died, or that stopped answering its health check, is restarted on the next call
from the weights saved last; the call that was in flight when it died raised ``GenerationError``.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from algos.generation.base import Completion, GenerationError, SamplingParams
from algos.generation.openai import OpenAIGenerator, save_for_vllm

logger = logging.getLogger(__name__)

SERVED_NAME = "policy"


def default_python() -> Path:
    """The python of the cached vLLM venv that ``scripts/vllm_venv.sh`` builds."""
    venv = os.environ.get("TIR_VLLM_VENV", Path.home() / ".cache" / "tir-gym" / "vllm-venv")
    return Path(venv) / "bin" / "python"


class ServerStartError(RuntimeError):
    """The server did not come up; the message ends with its log."""


class VLLMServer:
    """One ``vllm.entrypoints.openai.api_server`` process (and its engine children, one process
    group) serving the HF model directory ``model_dir``.

    ``python``: an interpreter that imports vllm (default: the cached venv's). ``args`` are
    further server flags (``--enforce-eager``, ``--tensor-parallel-size 2``, ...); ``env``
    further environment variables (``VLLM_CPU_KVCACHE_SPACE``, ...). The log goes to
    ``log_path`` (default: ``vllm-server.log`` beside ``model_dir``).
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        python: str | os.PathLike | None = None,
        dtype: str = "float32",
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        log_path: str | os.PathLike | None = None,
        startup_timeout: float = 900.0,
    ):
        self.model_dir = Path(model_dir)
        self.python = Path(python) if python is not None else default_python()
        check_python(self.python)
        self.dtype = dtype
        self.args = tuple(args)
        self.env = dict(env or {})
        self.log_path = Path(log_path) if log_path else self.model_dir.parent / "vllm-server.log"
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        """The OpenAI-compatible base URL (``.../v1``)."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start the server and wait until it answers ``/health``."""
        self.stop()
        self.port = free_port()
        command = [
            os.fspath(self.python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", os.fspath(self.model_dir), "--served-model-name", SERVED_NAME,
            "--host", "127.0.0.1", "--port", str(self.port), "--dtype", self.dtype,
            "--logprobs-mode", "processed_logprobs", "--generation-config", "vllm",
            *self.args,
        ]
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env.update(VLLM_SERVER_DEV_MODE="1", **self.env)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        logger.info("starting vLLM on port %d (log: %s)", self.port, self.log_path)
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env,
                                            start_new_session=True)
        while not self.healthy():
            if not self.running:
                code = self.process.returncode
                self.stop()
                raise ServerStartError(f"vLLM exited with code {code} while starting:\n"
                                       + self.log_tail())
            if time.monotonic() - started > self.startup_timeout:
                self.stop()
                raise ServerStartError(f"vLLM did not answer /health within "
                                       f"{self.startup_timeout:.0f} s:\n" + self.log_tail())
            time.sleep(1.0)
        logger.info("vLLM up on port %d after %.0f s", self.port, time.monotonic() - started)

    def healthy(self, timeout: float = 5.0) -> bool:
        if not self.running:
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health",
                                        timeout=timeout) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def ensure_running(self) -> bool:
        """Restart the server when it died or stopped answering; True when it did."""
        if self.healthy():
            return False
        logger.warning("vLLM server on port %s is down; restarting it from %s",
                       self.port, self.model_dir)
        self.start()
        return True

    def stop(self) -> None:
        """Terminate the whole process group (the API server and its engine processes)."""
        if self.process is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):  # SIGKILL: engine processes left behind
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                pass
        self.process = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, errors="replace") as log:
                return "".join(deque(log, lines))
        except OSError:
            return "(no log)"

    def __enter__(self) -> VLLMServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class VLLMServerGenerator(OpenAIGenerator):
    """Rollouts for ``tir train`` from a vLLM server this object starts (a ``VLLMServer``).

    ``model`` and ``tokenizer`` are saved to ``weights_dir``, the directory the server loads
    and reloads; the server runs in the model's dtype. ``server_kwargs`` go to ``VLLMServer``.
    A server that died is restarted by the next ``generate`` (from the last saved weights); a
    restart that fails raises ``ServerStartError``, which stops training rather than turning
    every later episode into an infra error.
    """

    def __init__(self, model, tokenizer, weights_dir: str | os.PathLike, *,
                 timeout: float = 600.0, **server_kwargs):
        weights_dir = Path(weights_dir)
        save_for_vllm(model, weights_dir)
        tokenizer.save_pretrained(weights_dir)
        dtype = str(model.dtype).removeprefix("torch.")
        self.server = VLLMServer(weights_dir, dtype=dtype, **server_kwargs)
        self.server.start()
        super().__init__(self.server.url, SERVED_NAME, tokenizer=tokenizer, timeout=timeout,
                         weights_dir=weights_dir)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        self._ensure_server()
        return super().generate(prompts, params)

    def update_weights(self, model) -> None:
        """Save ``model``; a live server reloads it, a dead one loads it when restarted."""
        save_for_vllm(model, self.weights_dir)
        if self._ensure_server():
            return
        try:
            self.reload_weights()
        except GenerationError as exc:
            logger.warning("vLLM failed while reloading weights (%s); the next call restarts "
                           "it from %s", exc, self.weights_dir)
            self.server.stop()

    def _ensure_server(self) -> bool:
        restarted = self.server.ensure_running()
        self.base_url = self.server.url
        return restarted

    def close(self) -> None:
        self.server.stop()


@dataclass(frozen=True)
class RolloutServer:
    """Where training rollouts come from: a vLLM server started from ``python`` (default: the
    cached venv's) with further ``args``, or the server at ``url`` that the user runs, which
    must read ``weights_dir`` (``update_weights``). Checked when built, before any work."""

    python: Path | None = None
    args: tuple[str, ...] = ()
    url: str | None = None

    def __post_init__(self) -> None:
        if self.url is None:
            check_python(self.python or default_python())
        elif self.python is not None or self.args:
            raise ValueError("a server at a URL is one you run; python and args configure one "
                             "that is started here: pass one or the other")
        elif not self.url.startswith(("http://", "https://")):
            raise ValueError(f"the server URL must be http(s), got {self.url!r}")

    def generator(self, policy, tokenizer, weights_dir: str | os.PathLike) -> OpenAIGenerator:
        """A backend that samples from ``policy`` now and follows its ``update_weights``."""
        if self.url is None:
            return VLLMServerGenerator(policy, tokenizer, weights_dir, python=self.python,
                                       args=self.args)
        generator = OpenAIGenerator(self.url, tokenizer=tokenizer, weights_dir=weights_dir)
        generator.update_weights(policy)  # the server may have started from other weights
        return generator


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_python(python: Path) -> None:
    """Refuse a missing interpreter up front, naming the script that builds the default one."""
    if not (python.is_file() and os.access(python, os.X_OK)):
        hint = (" (build it with: bash scripts/vllm_venv.sh)" if python == default_python()
                else "")
        raise FileNotFoundError(f"no python interpreter at {python}{hint}")
