"""Sandboxes that run model-written Python: ``make_sandbox("local" | "docker", **limits)``."""

from __future__ import annotations

from tir_envs.registry import Registry
from tir_envs.sandbox.base import (
    ExecResult,
    ExecStatus,
    Isolation,
    Limits,
    Sandbox,
    SandboxError,
    Session,
)

SANDBOXES: Registry = Registry("sandbox backend")
"""Sandbox factories by name; each imports its backend only when called."""


@SANDBOXES.register("local")
def _local(**kwargs) -> Sandbox:
    from tir_envs.sandbox.local import LocalSandbox

    return LocalSandbox(**kwargs)


@SANDBOXES.register("docker")
def _docker(**kwargs) -> Sandbox:
    from tir_envs.sandbox.docker import DockerSandbox

    return DockerSandbox(**kwargs)


BACKENDS = SANDBOXES.names()


def make_sandbox(backend: str = "local", **kwargs) -> Sandbox:
    """Create a sandbox. Keyword arguments are ``Limits`` fields plus backend-specific options."""
    return SANDBOXES[backend](**kwargs)


__all__ = [
    "BACKENDS",
    "ExecResult",
    "ExecStatus",
    "Isolation",
    "Limits",
    "Sandbox",
    "SANDBOXES",
    "SandboxError",
    "Session",
    "make_sandbox",
]
