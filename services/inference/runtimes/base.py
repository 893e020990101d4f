"""The one interface every runtime implements: provision, watch (status), scale, delete.

The reconciler drives an endpoint through it and turns what ``watch`` reports into status
changes; a runtime knows nothing of the database or the bus.
"""

from __future__ import annotations

import ctypes
import signal
import sys
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from libs.common.events.inference import CredentialError, open_environment

_PR_SET_PDEATHSIG = 1
# Looked up before any fork: the child runs only this call between fork and exec.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


def _die_with_parent() -> None:
    assert _prctl is not None
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def dies_with_parent() -> Callable[[], None] | None:
    """``preexec_fn`` for a server the inference process supervises: the kernel kills it when
    that process dies, even by SIGKILL (Linux; elsewhere None). A killed leader's servers then
    go with it, and the next leader starts them again, rather than orphans holding ports and
    GPUs that nothing supervises or meters."""
    return _die_with_parent if _prctl is not None else None


@dataclass(frozen=True)
class EndpointSpec:
    """What a runtime needs to run one endpoint (a snapshot of its row)."""

    endpoint_id: str
    project: str
    runtime_name: str
    asset_name: str
    version: str
    source_uri: str | None
    served_model_name: str
    replicas: int
    gpus: int
    gpu_type: str | None
    profile: str | None
    owner: str
    request_id: str | None
    # external endpoints: the registered base URL and the sealed credential.
    upstream_url: str | None = None
    sealed_credential: str | None = None
    # MCP servers: the stdio package to run behind the bridge, and its sealed environment.
    asset_kind: str = "model"
    package: dict[str, Any] | None = None
    sealed_environment: str | None = None


@dataclass(frozen=True)
class RuntimeStatus:
    """``pending`` (not serving yet, or again), ``ready`` at ``url``, or ``failed`` for good.
    ``urls``: every healthy replica's URL when a runtime balances none itself (the local one);
    the gateway spreads calls over them."""

    state: Literal["pending", "ready", "failed"]
    url: str | None = None
    reason: str = ""
    urls: tuple[str, ...] = ()


class RuntimeFailure(Exception):
    """The runtime cannot run this endpoint (bad spec, not configured): retrying will not help."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Runtime(Protocol):
    name: str

    async def provision(self, spec: EndpointSpec) -> None:
        """Create what serves the endpoint; idempotent (it may already exist)."""

    def watch(self, spec: EndpointSpec) -> AsyncGenerator[RuntimeStatus, None]:
        """Report the endpoint's state as it changes, until cancelled or ``failed``."""
        ...

    async def status(self, spec: EndpointSpec) -> RuntimeStatus:
        """The state now, in one look."""
        ...

    async def scale(self, spec: EndpointSpec, replicas: int) -> None:
        """Change the number of replicas of a running endpoint."""

    async def delete(self, spec: EndpointSpec) -> None:
        """Remove everything the endpoint used; idempotent (gone already is fine)."""

    async def aclose(self) -> None:
        """Release the runtime's own resources at shutdown."""


def environment_of(spec: EndpointSpec, key: bytes | None) -> dict[str, str]:
    """An MCP server endpoint's environment variables, opened for its process (or Secret)."""
    if spec.sealed_environment is None:
        return {}
    if key is None:
        raise RuntimeFailure("no key to open the endpoint's environment with")
    try:
        return open_environment(key, spec.sealed_environment)
    except CredentialError:
        raise RuntimeFailure("the endpoint's environment cannot be opened with this key") from None


def clip(text: str, limit: int = 1000) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
