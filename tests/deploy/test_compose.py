"""docker-compose.yml is valid against the Compose specification and runs the whole stack."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from cli.stack import SERVICES
from libs.common.settings import SERVICE_PORTS

COMPOSE = Path(__file__).parents[2] / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def test_the_file_is_valid_against_the_compose_specification(compose: dict[str, Any]) -> None:
    # The compose-spec JSON schema, as vendored by check-jsonschema.
    schema_file = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    jsonschema.validate(compose, schema)


def test_every_service_and_the_gateway_run_from_one_image_after_migrations(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    for name in (*SERVICES, "gateway"):
        assert name in services, name
        service = services[name]
        assert service.get("build") == "." or service.get("image") == services["migrate"].get(
            "image"
        )
        assert service["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert "healthcheck" in service, name
    assert {"postgres", "nats"} <= set(services)
    assert services["nats"]["command"][0] == "-js"


def test_each_process_gets_its_port_and_only_its_own_service_key(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in SERVICES:
        env = services[name]["environment"]
        assert env["STEWARD_PORT"] == str(SERVICE_PORTS[name])
        assert env[f"STEWARD_{name.upper()}_URL"].endswith(f":{SERVICE_PORTS[name]}")
    keyed = {
        name: {k for k in s.get("environment", {}) if k.endswith("_API_KEY")}
        for name, s in services.items()
    }
    assert keyed["gateway"] == {"STEWARD_GATEWAY_API_KEY"}
    assert keyed["inference"] == {"STEWARD_INFERENCE_API_KEY"}
    assert keyed["authz"] == set()
    audited = [n for n, s in services.items() if "STEWARD_AUDIT_KEY" in s.get("environment", {})]
    assert audited == ["approval"]
    assert keyed["migrate"] == {
        "STEWARD_BOOTSTRAP_API_KEY",
        "STEWARD_GATEWAY_API_KEY",
        "STEWARD_INFERENCE_API_KEY",
    }


def test_no_secret_is_written_into_the_file(compose: dict[str, Any]) -> None:
    for service in compose["services"].values():
        for name, value in service.get("environment", {}).items():
            if "KEY" in name or "PEPPER" in name:
                assert str(value).startswith("${"), name
