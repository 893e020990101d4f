"""Running an MCP server from its server.json ``packages`` (npm, PyPI, OCI; stdio transport).

Approval reads it to check an endpoint request's environment when it is filed (the declared
variables only, the required ones given); inference reads it to build the command the local
runtime starts behind the stdio bridge. How a registry's packages run on a host is the
operator's choice (``STEWARD_INFERENCE_MCP_RUNNERS``), never the publisher's: server.json's
``runtimeHint`` and ``runtimeArguments`` are not used (a publisher could otherwise ask Docker for
``--privileged`` or a host mount).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# Environment variable names a server.json may declare (POSIX portable names).
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
_ENV_NAME = re.compile(ENV_NAME)

# The operator's default runners: how each registry's packages start, ``{identifier}`` and
# ``{version}`` filled from the package; the package's own arguments follow.
DEFAULT_RUNNERS: dict[str, list[str]] = {
    "npm": ["npx", "--yes", "{identifier}@{version}"],
    "pypi": ["uvx", "{identifier}=={version}"],
    "oci": ["docker", "run", "--rm", "-i", "{env_flags}", "{identifier}:{version}"],
}


class PackageProblem(ValueError):
    """The server cannot run from its packages as asked (a message for the requester)."""


@dataclass(frozen=True)
class EnvVar:
    name: str
    required: bool
    secret: bool
    default: str | None


@dataclass(frozen=True)
class StdioPackage:
    """The first package of a server.json that speaks stdio."""

    registry_type: str
    identifier: str
    version: str | None
    arguments: tuple[str, ...]
    environment: tuple[EnvVar, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "registry_type": self.registry_type,
            "identifier": self.identifier,
            "version": self.version,
            "arguments": list(self.arguments),
            "environment": [vars(e) for e in self.environment],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StdioPackage:
        return cls(
            registry_type=str(data["registry_type"]),
            identifier=str(data["identifier"]),
            version=data.get("version"),
            arguments=tuple(str(a) for a in data.get("arguments") or ()),
            environment=tuple(EnvVar(**e) for e in data.get("environment") or ()),
        )

    def check_environment(self, given: Mapping[str, str]) -> dict[str, str]:
        """The environment to run with: defaults, then ``given``; refuses names the package
        does not declare and required variables left without a value."""
        declared = {e.name: e for e in self.environment}
        unknown = sorted(set(given) - set(declared))
        if unknown:
            raise PackageProblem(
                f"{', '.join(unknown)}: not an environment variable the package declares "
                f"(it declares {sorted(declared) or 'none'})"
            )
        values = {e.name: e.default for e in self.environment if e.default is not None}
        values.update(given)
        missing = [e.name for e in self.environment if e.required and not values.get(e.name)]
        if missing:
            raise PackageProblem(f"the package needs {', '.join(missing)}")
        return {k: v for k, v in values.items() if v is not None}

    def check_runtime(self, runtime: str) -> None:
        """Where an endpoint may run it: locally, or on Kubernetes (ToolHive) as an OCI image."""
        if runtime == "external":
            raise PackageProblem("MCP servers run on the local or kubernetes runtime")
        if runtime == "kubernetes" and self.registry_type != "oci":
            raise PackageProblem(
                f"on Kubernetes MCP servers run from OCI images; this is a "
                f"{self.registry_type} package: ask for the local runtime"
            )

    def command(self, runners: Mapping[str, Sequence[str]], env_names: Sequence[str]) -> list[str]:
        """The command line that starts it with the operator's runner for its registry."""
        runner = runners.get(self.registry_type)
        if runner is None:
            raise PackageProblem(
                f"this host runs no {self.registry_type} packages (runners: {sorted(runners)})"
            )
        values = {"identifier": self.identifier, "version": self.version or "latest"}
        command: list[str] = []
        for part in runner:
            if part == "{env_flags}":  # docker: pass each variable by name, value from our env
                command += [flag for name in env_names for flag in ("-e", name)]
                continue
            try:
                command.append(part.format(**values))
            except (KeyError, IndexError, ValueError) as exc:
                raise PackageProblem(
                    f"the {self.registry_type} runner is malformed: {exc}"
                ) from exc
        return command + list(self.arguments)


def stdio_package(server: Mapping[str, Any]) -> StdioPackage | None:
    """The first stdio package of a server.json document, or None."""
    for package in server.get("packages") or ():
        if not isinstance(package, dict) or (package.get("transport") or {}).get("type") != "stdio":
            continue
        identifier, registry = package.get("identifier"), package.get("registryType")
        if not isinstance(identifier, str) or not isinstance(registry, str):
            continue
        environment = tuple(
            EnvVar(
                name=str(v["name"]),
                required=bool(v.get("isRequired")),
                secret=bool(v.get("isSecret")),
                default=v.get("default") if isinstance(v.get("default"), str) else None,
            )
            for v in package.get("environmentVariables") or ()
            if isinstance(v, dict) and _ENV_NAME.match(str(v.get("name", "")))
        )
        return StdioPackage(
            registry_type=registry,
            identifier=identifier,
            version=package.get("version") if isinstance(package.get("version"), str) else None,
            arguments=tuple(_arguments(package.get("packageArguments") or ())),
            environment=environment,
        )
    return None


def _arguments(arguments: Sequence[Any]) -> list[str]:
    """Arguments with a value (or default) as given; an optional one without is left out, a
    required one without is refused (Steward does not ask requesters for argument values)."""
    out: list[str] = []
    for argument in arguments:
        if not isinstance(argument, dict):
            continue
        value = argument.get("value") or argument.get("default")
        if argument.get("type") == "named":
            if value is None:
                if argument.get("isRequired"):
                    raise PackageProblem(
                        f"the package argument {argument.get('name')} needs a value"
                    )
                continue
            out += [str(argument["name"]), str(value)]
        elif value is not None:
            out.append(str(value))
        elif argument.get("isRequired"):
            hint = argument.get("valueHint") or "a positional argument"
            raise PackageProblem(f"the package argument {hint} needs a value")
    return out
