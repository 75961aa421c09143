"""Sandboxes that run model-written Python: ``make_sandbox("local" | "docker", **limits)``."""

from __future__ import annotations

from tir_envs.sandbox.base import (
    ExecResult,
    ExecStatus,
    Isolation,
    Limits,
    Sandbox,
    SandboxError,
    Session,
)

BACKENDS = ("local", "docker")


def make_sandbox(backend: str = "local", **kwargs) -> Sandbox:
    """Create a sandbox. Keyword arguments are ``Limits`` fields plus backend-specific options."""
    if backend == "local":
        from tir_envs.sandbox.local import LocalSandbox

        return LocalSandbox(**kwargs)
    if backend == "docker":
        from tir_envs.sandbox.docker import DockerSandbox

        return DockerSandbox(**kwargs)
    raise ValueError(f"unknown sandbox backend {backend!r}; choose one of {BACKENDS}")


__all__ = [
    "BACKENDS",
    "ExecResult",
    "ExecStatus",
    "Isolation",
    "Limits",
    "Sandbox",
    "SandboxError",
    "Session",
    "make_sandbox",
]
