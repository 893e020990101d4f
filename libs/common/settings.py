"""Settings shared by every process, read from ``STEWARD_*`` environment variables.

Every default works for the embedded mode (SQLite files and a local NATS under ``.steward/``),
so ``steward up`` needs no configuration; production sets the same names from Helm values.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import secrets
from functools import cached_property
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from urllib.parse import urlparse

from pydantic import Field, IPvAnyNetwork, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_REPO_CONSOLE = Path(__file__).resolve().parents[2] / "console"

SERVICE_PORTS: dict[str, int] = {
    "authz": 8101,
    "catalog": 8102,
    "approval": 8103,
    "inference": 8104,
    "metering": 8105,
}


def nats_servers(url: str) -> list[str]:
    """``STEWARD_NATS_URL`` names one server or a cluster's, separated by commas."""
    found = [s.strip() for s in url.split(",") if s.strip()]
    if not found:
        raise ValueError("no NATS server in the URL")
    return found


class Settings(BaseSettings):
    """One settings object for all services; each reads the fields it needs."""

    model_config = SettingsConfigDict(env_prefix="STEWARD_", extra="ignore")

    data_dir: Path = Path(".steward")
    # ``{service}`` is replaced by the service name: one SQLite file per service, and on
    # PostgreSQL one schema per service in a shared database.
    database_url: str = "sqlite+aiosqlite:///{data_dir}/{service}.db"
    # One server, or a cluster's servers separated by commas.
    nats_url: str = "nats://127.0.0.1:4222"
    # How many servers keep each stream and bucket: 1 on one server, 3 on a 3-node cluster.
    nats_replicas: int = Field(default=1, ge=1, le=5)
    # Prefix of every subject and stream, so that several installations (or test runs) can
    # share one NATS server without hearing each other.
    event_namespace: str = "steward"

    host: str = "127.0.0.1"
    port: int | None = None
    log_level: str = "INFO"

    # Server-side secret mixed into every API key hash. Unset in the embedded mode: a random
    # one is created once under data_dir with mode 0600.
    api_key_pepper: SecretStr | None = None
    # A platform-admin key to install on first start (Helm/compose set it from a Secret);
    # unset, the first start mints one and shows it once.
    bootstrap_api_key: SecretStr | None = None

    oidc_issuer: str | None = None
    oidc_audience: str | None = None
    oidc_provider: str = Field(default="oidc", pattern="^(oidc|keycloak)$")
    keycloak_url: str | None = None
    keycloak_realm: str | None = None
    keycloak_client_id: str = "steward"
    oidc_algorithms: list[str] = ["RS256", "RS384", "RS512", "ES256", "ES384", "PS256"]
    oidc_jwks_ttl_seconds: float = 300.0
    oidc_jwks_min_refresh_seconds: float = 30.0
    oidc_leeway_seconds: float = 30.0

    otel_exporter_otlp_endpoint: str | None = None
    # How often OpenTelemetry metrics are pushed to that endpoint (the SDK's default).
    otel_metric_export_interval_seconds: float = Field(default=60.0, gt=0)

    key_rotation_grace_seconds: int = 24 * 3600
    key_last_used_flush_seconds: float = 30.0
    outbox_poll_seconds: float = 1.0

    authz_url: str = "http://127.0.0.1:8101"
    catalog_url: str = "http://127.0.0.1:8102"
    approval_url: str = "http://127.0.0.1:8103"
    inference_url: str = "http://127.0.0.1:8104"
    metering_url: str = "http://127.0.0.1:8105"

    # Private and loopback networks a tenant-named upstream (an external endpoint's URL, an MCP
    # server's remote) may live in (libs/common/netpolicy.py). The embedded default allows
    # loopback so a local Ollama or llama.cpp works; Steward's own ports are refused regardless.
    upstream_allowed_networks: list[IPvAnyNetwork] = [
        IPv4Network("127.0.0.0/8"),
        IPv6Network("::1/128"),
    ]

    # -- gateway (gateway/): proxy and Kong-compatible admin ports, and what it may fetch.
    gateway_proxy_port: int = 8000
    gateway_admin_port: int = 8001
    # Gateway processes on this host (gateway/workers.py): all accept on the proxy port; worker
    # i's admin API is on gateway_admin_port + i. Set by the supervisor for each worker: its index.
    gateway_workers: int = Field(default=1, ge=1, le=64)
    gateway_worker: int | None = Field(default=None, ge=0)

    @property
    def gateway_state_dir(self) -> Path:
        """The in-flight journal and the usage spool: one per gateway process."""
        base = self.data_dir / "gateway"
        return base if self.gateway_worker is None else base / f"worker-{self.gateway_worker}"

    # A platform API key holding keys:manage and catalog:read: the gateway fetches the authz
    # and catalog snapshots with it (it has no database of its own).
    gateway_api_key: SecretStr | None = None
    # Model routes declared in a YAML/JSON file until inference endpoint events feed them.
    gateway_routes_file: Path | None = None
    # A Kong 3.x declarative config (kong.yml) loaded at start; POST /config replaces it.
    gateway_kong_config: Path | None = None
    gateway_max_request_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    gateway_max_tokens: int = Field(default=32_768, gt=0)
    # The gateway's URL as clients reach it (MCP discovery and OAuth metadata); unset: as the
    # request's Host header says.
    gateway_public_url: str | None = None
    # MCP tool calls that may change something (read_write, execute) are audited with their
    # arguments; a key whose name contains one of these (any case) is stored as "[redacted]".
    gateway_audit_redact_keys: list[str] = [
        "password",
        "passwd",
        "secret",
        "token",
        "key",
        "authorization",
        "credential",
        "cookie",
    ]
    # Where catalog versions' file:// tokenizers may lie (a JSON list; empty: data_dir/tokenizers).
    gateway_tokenizer_roots: list[Path] = []
    # Client-side limits of the proxy listener (gateway/app.py server_config): a request's head
    # must arrive within the header timeout (else the connection is closed), its whole body
    # within the body timeout (else 408), an idle kept-alive connection is closed after
    # keep-alive seconds, and past max connections new requests get 503.
    gateway_header_timeout_seconds: float = Field(default=10.0, gt=0)
    gateway_body_timeout_seconds: float = Field(default=30.0, gt=0)
    gateway_keep_alive_seconds: int = Field(default=15, gt=0)
    gateway_max_connections: int = Field(default=10_000, gt=0)
    gateway_upstream_connect_timeout_seconds: float = 5.0
    # Longest wait for the next byte from an upstream (a whole answer, or the next SSE chunk).
    gateway_upstream_read_timeout_seconds: float = 300.0
    gateway_upstream_max_connections: int = 512
    # Re-read the snapshots this often as a safety net behind the events.
    gateway_resync_seconds: float = 300.0
    # Tell authz which keys were used this often (their "last used", to this precision).
    gateway_key_usage_seconds: float = Field(default=60.0, gt=0, le=3600)
    # While NATS is down, ask authz this often whether keys, entitlements or members changed
    # (a 304 when not): the most a revoked key keeps working without the events.
    gateway_offline_poll_seconds: float = Field(default=1.0, gt=0, le=60)
    # The web console's static files, served at /console/: the repository's console/ unless set
    # (None when this is an installed copy without it: the gateway then looks beside itself).
    gateway_console_dir: Path | None = _REPO_CONSOLE if _REPO_CONSOLE.is_dir() else None

    # -- metering (services/metering): usage ingest, retention, quotas, webhooks, prices.
    # Usage events applied per transaction (one JetStream fetch).
    metering_batch_size: int = Field(default=1000, ge=1, le=10_000)
    # Seconds before JetStream redelivers usage events a crashed metering left unacknowledged.
    metering_ack_wait_seconds: float = Field(default=30.0, gt=0)
    # Raw usage events are kept this long; per-minute aggregates (what reports read) longer.
    metering_raw_retention_days: int = Field(default=30, ge=1)
    metering_aggregate_retention_days: int = Field(default=400, ge=1)
    # Event ids remembered for de-duplication: longer than the USAGE stream keeps events (7 d).
    metering_inbox_retention_days: int = Field(default=8, ge=8)
    metering_retention_interval_seconds: float = Field(default=3600.0, gt=0)
    # The gateway hears a quota's usage at most this often (plus at once on warning/exceeded).
    metering_quota_publish_seconds: float = Field(default=0.5, gt=0)
    metering_soft_threshold: float = Field(default=0.8, gt=0, lt=1)
    # Called on every quota warning and exceeded (besides a quota's own webhook_url), and when
    # a dedicated endpoint goes over its approved cost plan.
    metering_quota_webhooks: list[str] = []
    # How often endpoints that hold GPUs are checked against their approved plan.
    metering_plan_check_seconds: float = Field(default=60.0, gt=0)
    # Signs webhook bodies (X-Steward-Signature: sha256=HMAC(secret, body)) when set.
    metering_webhook_secret: SecretStr | None = None
    metering_webhook_timeout_seconds: float = Field(default=5.0, gt=0)
    metering_webhook_max_attempts: int = Field(default=8, ge=1)
    metering_webhook_retry_seconds: float = Field(default=1.0, gt=0)
    # Prices in the price table are in this currency; reports show costs in it.
    metering_currency: str = Field(default="USD", pattern=r"^[A-Z]{3}$")

    # -- inference (services/inference) and what it shares with the gateway.
    # The GPU pool endpoints are provisioned from, by type: STEWARD_GPU_POOL='{"nvidia-a100": 8}'.
    gpu_pool: dict[str, int] = {"gpu": 8}
    # The secret (any long random string) whose SHA-256 is the Fernet key sealing external
    # endpoints' upstream credentials at rest and on the bus; the gateway opens them with the
    # same key. Unset in the embedded mode: one is created once under data_dir (mode 0600).
    upstream_credential_key: SecretStr | None = None
    # Any long random string, kept outside the database: it keys the audit chain's HMAC and
    # seeds the Ed25519 key that signs its checkpoints (approval). Unset in the embedded mode:
    # one is created once under data_dir (mode 0600).
    audit_key: SecretStr | None = None
    # Where approval appends each signed audit checkpoint (JSON lines), beside the NATS KV
    # bucket; "" for none (e.g. on Kubernetes without a volume: the bucket alone).
    audit_checkpoint_file: str = "{data_dir}/audit-checkpoints.jsonl"
    # A platform API key holding catalog:read: inference reads an approved version's source
    # URI with it when it provisions from an approval event (there is no caller to ask for).
    inference_api_key: SecretStr | None = None

    @field_validator(
        "api_key_pepper",
        "bootstrap_api_key",
        "gateway_api_key",
        "upstream_credential_key",
        "inference_api_key",
        "audit_key",
        mode="before",
    )
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        # Compose and Helm pass unset secrets as empty strings.
        return None if value == "" else value

    @field_validator("nats_url")
    @classmethod
    def _some_nats_server(cls, value: str) -> str:
        nats_servers(value)
        return value

    @field_validator("metering_webhook_secret", mode="before")
    @classmethod
    def _blank_metering_secret(cls, value: object) -> object:
        return None if value == "" else value

    def database_url_for(self, service: str) -> str:
        """The URL a service connects to; SQLite files live under ``data_dir``."""
        url = self.database_url.replace("{data_dir}", str(self.data_dir))
        if url.startswith("sqlite") and "{service}" not in url:
            raise ValueError("a SQLite STEWARD_DATABASE_URL must contain {service}")
        return url.replace("{service}", service)

    def port_for(self, service: str) -> int:
        """``port`` when set; else the port of the service's own URL (``authz_url`` …), so the
        URL others call it on and the port it listens on cannot disagree."""
        url: str = getattr(self, f"{service}_url")
        return self.port or urlparse(url).port or SERVICE_PORTS[service]

    def _secret_file(self, name: str) -> bytes:
        """A random secret created once under data_dir (0600): the embedded mode's default."""
        path = self.data_dir / name
        if not path.exists():
            # Written whole under a private name, then linked into place: two services starting
            # together agree on one secret, and neither reads a half-written file.
            self.data_dir.mkdir(parents=True, exist_ok=True)
            draft = path.with_name(f".{name}.{os.getpid()}.{secrets.token_hex(4)}")
            fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(48))
            try:
                with contextlib.suppress(FileExistsError):
                    os.link(draft, path)
            finally:
                draft.unlink()
        return path.read_text().strip().encode()

    @cached_property
    def audit_secret(self) -> bytes:
        """The audit chain's secret: configured, or created once for the embedded mode."""
        if self.audit_key is not None:
            return self.audit_key.get_secret_value().encode()
        return self._secret_file("audit.key")

    @property
    def audit_checkpoint_path(self) -> Path | None:
        path = self.audit_checkpoint_file.replace("{data_dir}", str(self.data_dir))
        return Path(path) if path else None

    @property
    def tokenizer_roots(self) -> list[Path]:
        return self.gateway_tokenizer_roots or [self.data_dir / "tokenizers"]

    @cached_property
    def pepper(self) -> bytes:
        """The API key pepper: configured, or created once for the embedded mode."""
        if self.api_key_pepper is not None:
            return self.api_key_pepper.get_secret_value().encode()
        return self._secret_file("pepper")

    @cached_property
    def upstream_credential_fernet_key(self) -> bytes:
        """The Fernet key sealing upstream credentials, derived from the configured secret (any
        long random string: base64url(SHA-256(secret))), or from one created once under
        data_dir in the embedded mode. Inference seals with it; the gateway opens with it."""
        if self.upstream_credential_key is not None:
            secret = self.upstream_credential_key.get_secret_value().encode()
        else:
            secret = self._secret_file("upstream-credential.key")
        return base64.urlsafe_b64encode(hashlib.sha256(secret).digest())
