"""How the CLI reaches Steward: through the gateway's ``/api/{service}`` when ``STEWARD_URL`` is
set (production), else straight to each service's URL from the settings (the embedded default).

The credential comes from ``STEWARD_API_KEY`` or from the file ``steward login`` wrote (mode
0600, like a kubeconfig).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported when a command calls a service: `steward --help` starts without
    import httpx

    from libs.common.settings import Settings


class CliError(Exception):
    """A failure to show the user as one line (and exit non-zero)."""


def credentials_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "steward" / "credentials"


def save_key(key: str) -> Path:
    path = credentials_file()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.strip() + "\n")
    return path


def load_key() -> str:
    if key := os.environ.get("STEWARD_API_KEY"):
        return key.strip()
    path = credentials_file()
    if path.exists():
        return path.read_text().strip()
    raise CliError("no credential: run `steward login` or set STEWARD_API_KEY")


class Api:
    def __init__(
        self,
        settings: Settings | None = None,
        key: str | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        import httpx

        from libs.common.settings import Settings

        self.settings = settings or Settings()
        self.gateway = os.environ.get("STEWARD_URL", "").rstrip("/") or None
        self._key = key
        self.http = httpx.Client(timeout=30.0, transport=transport)

    @property
    def key(self) -> str:
        if self._key is None:
            self._key = load_key()
        return self._key

    def url(self, service: str, path: str) -> str:
        if self.gateway:
            return f"{self.gateway}/api/{service}{path}"
        base: str = getattr(self.settings, f"{service}_url")
        return f"{base.rstrip('/')}{path}"

    def call(
        self,
        method: str,
        service: str,
        path: str,
        *,
        json_body: Any = None,
        content: bytes | None = None,
        content_type: str | None = None,
        params: dict[str, Any] | None = None,
        missing_ok: bool = False,
    ) -> Any:
        """One API call; a problem+json answer becomes a CliError carrying its detail."""
        import httpx  # loaded by __init__ already: a dictionary lookup

        headers = {"Authorization": f"Bearer {self.key}"}
        if content_type:
            headers["content-type"] = content_type
        try:
            response = self.http.request(
                method,
                self.url(service, path),
                json=json_body,
                content=content,
                params={k: v for k, v in (params or {}).items() if v is not None},
                headers=headers,
            )
        except httpx.TransportError as exc:
            raise CliError(f"{service} is unreachable at {self.url(service, '')}: {exc}") from exc
        if missing_ok and response.status_code == 404:
            return None
        if response.status_code >= 400:
            raise CliError(describe_problem(response))
        if not response.content:
            return None
        if response.headers.get("content-type", "").startswith("text/"):
            return response.text
        return response.json()


def describe_problem(response: httpx.Response) -> str:
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"HTTP {response.status_code}: {response.text[:200]}"
    detail = body.get("detail") or body.get("message") or body
    errors = body.get("errors") or []
    lines = [f"HTTP {response.status_code}: {detail}"]
    lines += [f"  {e.get('field') or '-'}: {e.get('message')}" for e in errors[:20]]
    return "\n".join(lines)
