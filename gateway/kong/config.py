"""Reading declarative configs from files and request bodies (YAML or JSON, as Kong accepts)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from gateway.kong.schema import InvalidConfig, KongConfig, parse

STATE_FILE = "kong.json"


def decode(text: str | bytes) -> Any:
    """YAML is a superset of JSON: one parser reads both, as ``kong config parse`` does."""
    try:
        return yaml.safe_load(text)
    except RecursionError:
        raise InvalidConfig(
            {"@entity": ["failed parsing declarative configuration: nested too deeply"]}
        ) from None
    except yaml.YAMLError as exc:
        raise InvalidConfig(
            {"@entity": [f"failed parsing declarative configuration: {exc}"]}
        ) from None


def load_file(path: Path) -> KongConfig:
    return parse(decode(path.read_bytes()))


def save_state(config: KongConfig, directory: Path) -> None:
    """Keep the last accepted config, so a restart serves what POST /config installed."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (STATE_FILE + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(config.to_declarative(), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / STATE_FILE)


def load_state(directory: Path) -> KongConfig | None:
    path = directory / STATE_FILE
    return load_file(path) if path.exists() else None
