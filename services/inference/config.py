"""Inference's own settings (``STEWARD_INFERENCE_*``): runtimes, supervision, allowances.

The GPU pool and the credential key live in the shared ``Settings`` (``STEWARD_GPU_POOL``,
``STEWARD_UPSTREAM_CREDENTIAL_KEY``) because the gateway or the operator reads them too.
"""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, IPvAnyNetwork, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from libs.common.mcp_packages import DEFAULT_RUNNERS

# The built-in simulator: an OpenAI-compatible server that is not a model (see simulator.py).
SIMULATOR_COMMAND = [
    "{python}",
    "-m",
    "services.inference.simulator",
    "--host",
    "{host}",
    "--port",
    "{port}",
    "--served-model-name",
    "{served_model_name}",
]
# vLLM's own server, where vLLM is installed: ``{model}`` is the version's source (hf:// etc.).
VLLM_COMMAND = [
    "vllm",
    "serve",
    "{model}",
    "--host",
    "{host}",
    "--port",
    "{port}",
    "--served-model-name",
    "{served_model_name}",
]

# llama.cpp through llama-cpp-python's OpenAI-compatible server (pip install
# 'llama-cpp-python[server]'): a GGUF ``{model}`` (file:// or pkg://) on the CPU, or a GPU build.
LLAMA_CPP_COMMAND = [
    "{python}",
    "-m",
    "llama_cpp.server",
    "--model",
    "{model}",
    "--model_alias",
    "{served_model_name}",
    "--host",
    "{host}",
    "--port",
    "{port}",
    "--n_ctx",
    "2048",
]


class LocalProfile(BaseModel):
    """How to start an OpenAI-compatible server on this host.

    Placeholders in ``command``: ``{python}`` (this interpreter), ``{host}``, ``{port}``,
    ``{served_model_name}``, ``{model}`` (the version's source URI, ``hf://`` stripped),
    ``{data_dir}`` and ``{endpoint_id}``.
    """

    command: list[str] = Field(min_length=1)
    env: dict[str, str] = {}
    health_path: str = "/health"
    # Seconds the server may take to answer its health check before the start counts as failed.
    startup_timeout_seconds: float = Field(default=600.0, gt=0)


class InferenceConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STEWARD_INFERENCE_", extra="ignore")

    # -- local runtime
    local_profiles: dict[str, LocalProfile] = {
        "simulator": LocalProfile(command=SIMULATOR_COMMAND),
        "vllm": LocalProfile(command=VLLM_COMMAND),
        "llama-cpp": LocalProfile(
            command=LLAMA_CPP_COMMAND, health_path="/v1/models", startup_timeout_seconds=120
        ),
    }
    # The profile an approved ``local`` endpoint request runs with.
    local_default_profile: str = "simulator"
    # The local profile that serves a catalog version whose serving.runtime names an engine (a
    # GGUF model marked llama.cpp runs on llama.cpp); any other version gets the default profile.
    local_runtime_profiles: dict[str, str] = {"llama.cpp": "llama-cpp"}
    local_host: str = "127.0.0.1"
    # Replicas of one endpoint on this host (each a process on its own port).
    local_max_replicas: int = Field(default=8, ge=1, le=64)
    # A replica scaled away leaves the gateway's routes this long before it is stopped.
    scale_down_drain_seconds: float = Field(default=1.0, ge=0)
    # How this host runs MCP server packages, by registry: ``{identifier}`` and ``{version}``
    # come from the catalog version's server.json (libs/common/mcp_packages.py). The publisher's
    # runtimeHint and runtimeArguments are never used.
    mcp_runners: dict[str, list[str]] = DEFAULT_RUNNERS
    # An MCP package may be fetched on its first start (npx, uvx, docker pull).
    mcp_startup_timeout_seconds: float = Field(default=300.0, gt=0)
    health_interval_seconds: float = Field(default=2.0, gt=0)
    # Restart a crashed server after 0.5 s, 1 s, 2 s… up to the cap; after ``max_restarts``
    # crashes in a row (a crash after a healthy minute resets the count) the endpoint fails.
    restart_initial_seconds: float = Field(default=0.5, gt=0)
    restart_max_seconds: float = Field(default=30.0, gt=0)
    max_restarts: int = Field(default=5, ge=0)
    stable_after_seconds: float = Field(default=60.0, gt=0)
    stop_grace_seconds: float = Field(default=10.0, gt=0)

    # -- kubernetes runtime (KServe)
    kubeconfig: Path | None = None
    kube_context: str | None = None
    # Emit a KServe ``InferenceService`` (v1beta1) or an llm-d ``LLMInferenceService``.
    kube_kind: Literal["InferenceService", "LLMInferenceService"] = "InferenceService"
    kube_namespace_prefix: str = Field(default="steward-", pattern=r"^[a-z0-9-]{0,20}$")
    # The ServingRuntime and model format of the predictor.
    kserve_runtime: str = "kserve-huggingfaceserver"
    kserve_model_format: Literal["vLLM", "huggingface"] = "huggingface"
    # Path appended to the InferenceService's status.url to reach its OpenAI API.
    kserve_openai_path: str = "/openai/v1"

    # -- external runtime
    probe_interval_seconds: float = Field(default=15.0, gt=0)
    probe_timeout_seconds: float = Field(default=5.0, gt=0)
    # External upstreams may not live here: cloud metadata endpoints and link-local addresses
    # (the probe and the gateway would otherwise fetch them on a project-admin's say-so).
    external_denied_networks: list[IPvAnyNetwork] = [
        IPv4Network("169.254.0.0/16"),
        IPv4Network("100.100.100.200/32"),
        IPv6Network("fe80::/10"),
        IPv6Network("fd00:ec2::254/128"),
    ]

    # -- provisioning in general
    reconcile_seconds: float = Field(default=1.0, gt=0)
    # Provisioning that has not reached ready after this long fails.
    provision_timeout_seconds: float = Field(default=1800.0, gt=0)
    # GPUs one project may hold at once (all types); unset: as many as the pool has free.
    project_gpu_limit: int | None = Field(default=None, ge=0)
    project_gpu_limits: dict[str, int] = {}

    @field_validator("kubeconfig", "kube_context", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @model_validator(mode="after")
    def _default_profile_exists(self) -> InferenceConfig:
        if self.local_default_profile not in self.local_profiles:
            raise ValueError(f"no local profile named {self.local_default_profile!r}")
        return self

    def profile_for(self, serving_runtime: str | None, asked: str | None = None) -> str:
        """The local profile to run a version with: the one asked for, else the one its
        serving runtime maps to (when configured), else the default."""
        if asked is not None:
            return asked
        mapped = self.local_runtime_profiles.get(serving_runtime or "")
        return mapped if mapped in self.local_profiles else self.local_default_profile

    def gpu_limit_for(self, project: str) -> int | None:
        return self.project_gpu_limits.get(project, self.project_gpu_limit)
