"""Running a server.json's stdio package: the command from the operator's runner, the package's
own arguments, and the environment it declares (the published example in tests/fixtures)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from libs.common.mcp_packages import DEFAULT_RUNNERS, PackageProblem, stdio_package

FIXTURES = Path(__file__).parents[1] / "fixtures" / "mcp-registry" / "valid"


def weather() -> dict[str, object]:
    document: dict[str, object] = json.loads((FIXTURES / "with-package.json").read_text())
    return document


def test_the_published_npm_example_runs_with_npx_and_its_given_arguments() -> None:
    package = stdio_package(weather())
    assert package is not None
    # The positional argument has only a valueHint (no value): left out; the named one is given.
    assert package.command(DEFAULT_RUNNERS, []) == [
        "npx",
        "--yes",
        "@modelcontextprotocol/server-weather@1.0.0",
        "--port",
        "8080",
    ]
    assert [(e.name, e.required, e.secret) for e in package.environment] == [
        ("API_KEY", True, True)
    ]
    assert package.check_environment({"API_KEY": "k"}) == {"API_KEY": "k"}
    with pytest.raises(PackageProblem, match="needs API_KEY"):
        package.check_environment({})
    with pytest.raises(PackageProblem, match="LD_PRELOAD: not an environment variable"):
        package.check_environment({"API_KEY": "k", "LD_PRELOAD": "/x.so"})
    # What travels with the endpoint reads back the same.
    assert type(package).from_dict(package.as_dict()) == package


def test_docker_gets_variables_by_name_and_never_the_publishers_runtime_arguments() -> None:
    server = {
        "packages": [
            {
                "registryType": "oci",
                "identifier": "ghcr.io/acme/tickets",
                "version": "2.1.0",
                "transport": {"type": "stdio"},
                "runtimeHint": "docker",
                "runtimeArguments": [{"type": "named", "name": "--privileged", "value": "true"}],
                "environmentVariables": [{"name": "TOKEN"}, {"name": "REGION", "default": "eu"}],
            }
        ]
    }
    package = stdio_package(server)
    assert package is not None
    env = package.check_environment({"TOKEN": "t"})
    assert env == {"REGION": "eu", "TOKEN": "t"}
    command = package.command(DEFAULT_RUNNERS, sorted(env))
    assert command == [
        "docker",
        "run",
        "--rm",
        "-i",
        "-e",
        "REGION",
        "-e",
        "TOKEN",
        "ghcr.io/acme/tickets:2.1.0",
    ]
    assert "--privileged" not in command


def test_only_stdio_packages_run_and_unknown_registries_are_refused() -> None:
    remote_only = {
        "packages": [
            {
                "registryType": "npm",
                "identifier": "x",
                "transport": {"type": "sse", "url": "https://x"},
            }
        ]
    }
    assert stdio_package(remote_only) is None
    assert stdio_package({}) is None
    nuget = stdio_package(
        {"packages": [{"registryType": "nuget", "identifier": "X", "transport": {"type": "stdio"}}]}
    )
    assert nuget is not None
    with pytest.raises(PackageProblem, match="runs no nuget packages"):
        nuget.command(DEFAULT_RUNNERS, [])
    required = {
        "packages": [
            {
                "registryType": "pypi",
                "identifier": "x",
                "transport": {"type": "stdio"},
                "packageArguments": [{"type": "positional", "valueHint": "db", "isRequired": True}],
            }
        ]
    }
    with pytest.raises(PackageProblem, match="db needs a value"):
        stdio_package(required)
