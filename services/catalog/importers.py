"""Reading the two import formats into normalised catalog entries, refusing bad input whole.

- A GitOps ``catalog.yaml`` in the shape of Kubeflow model-registry's catalog source file:
  ``source``, ``models[]`` (``artifacts[].uri``) and ``mcp_servers[]``. Like Kubeflow, unknown
  fields are ignored; Steward reads a few optional extensions (``version``, ``digest``,
  ``serving``, ``tags``, a tool's ``accessType``).
- MCP registry ``server.json`` documents, validated by the rules of the official schema
  (reverse-DNS name with one slash, description of at most 100 characters, pinned package
  versions — never ``latest`` or a range —, transports, remotes over http(s)…). Steward reads
  tags and tools from ``_meta["io.modelcontextprotocol.registry/publisher-provided"]``.

Every problem is reported with the path of the field (``models[2].artifacts[0].uri``); one bad
entry refuses the whole import, so nothing is ever half imported.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from libs.common.artifacts import LOCAL_SCHEMES
from libs.common.errors import Unprocessable
from libs.common.events.catalog import ToolRef
from libs.common.names import AssetName, ToolName

# A model's artifact: a registry or bucket, or a file on the serving host (a local GGUF, or one
# an installed package carries: libs/common/artifacts.py).
ALLOWED_SCHEMES = ("oci", "hf", "s3", "pvc", *LOCAL_SCHEMES)
TOKENIZER_SCHEMES = LOCAL_SCHEMES
PUBLISHER_META = "io.modelcontextprotocol.registry/publisher-provided"
SHA256 = re.compile(r"^sha256:[a-f0-9]{64}$")
_OCI_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,99}$")

Tag = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")]
Access = Literal["read_only", "read_write", "execute"]


def _pinned(value: str) -> str:
    """A specific version: neither the floating ``latest`` nor a range such as ``^1.2``."""
    if value == "latest":
        raise ValueError("'latest' is a floating tag; pin a specific version")
    if (
        value[:1] in {"^", "~", ">", "<", "="}
        or "||" in value
        or " " in value
        or any(part in {"x", "X", "*"} for part in value.split("."))
    ):
        raise ValueError("version ranges are not allowed; pin a specific version")
    return value


VersionName = Annotated[
    str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+:-]{0,99}$"), AfterValidator(_pinned)
]


class _Lenient(BaseModel):
    """Published formats carry fields Steward does not use; their owners ignore them too."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


@dataclass(frozen=True)
class Entry:
    """One asset version, normalised, ready to be written."""

    kind: Literal["model", "mcp_server"]
    name: str
    version: str
    description: str
    provider: str
    tags: list[str]
    tools: list[ToolRef]
    spec: dict[str, Any]
    source: str
    where: str  # the entry's path in the input, for error messages
    checklist: list[dict[str, Any]] = field(default_factory=list)

    @property
    def content_hash(self) -> str:
        canonical = json.dumps(
            {
                "description": self.description,
                "provider": self.provider,
                "tags": self.tags,
                "tools": [t.model_dump() for t in self.tools],
                "spec": self.spec,
            },
            sort_keys=True,
            separators=(",", ":"),
            default=str,
        )
        return hashlib.sha256(canonical.encode()).hexdigest()


def _tags(values: Sequence[str]) -> list[str]:
    return sorted({v.lower() for v in values})


def _epoch(value: str | int | None) -> str | None:
    if value is None:
        return None
    text = str(value)
    if not text.isdigit():
        raise ValueError('must be milliseconds since the epoch, e.g. "1737331200000"')
    return text


Epoch = Annotated[str | int | None, AfterValidator(_epoch)]


# -- Kubeflow catalog.yaml --------------------------------------------------------------------


class Serving(BaseModel):
    """Steward extension: how the model is meant to be served."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    runtime: Literal["vllm", "tgi", "triton", "llama.cpp", "other"] = "vllm"
    gpus: int | None = Field(default=None, ge=0, le=64)
    context_length: int | None = Field(default=None, ge=1, le=10_000_000, alias="contextLength")
    # The model's own tokenizer (a Hugging Face tokenizer.json, or a GGUF model's vocabulary), for
    # exact token counts where the engine reports none: file:///path or pkg://<package>/<path>.
    # A local GGUF artifact is its own tokenizer without this.
    tokenizer: str | None = Field(default=None, max_length=1000)

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer_uri(cls, value: str | None) -> str | None:
        if value is None:
            return None
        scheme, sep, rest = value.partition("://")
        if scheme not in TOKENIZER_SCHEMES or not sep or not rest.endswith((".json", ".gguf")):
            raise ValueError(
                "must name a tokenizer.json or a GGUF model as file:///path/tokenizer.json or "
                f"pkg://<package>/<path>.gguf; got {value!r}"
            )
        if scheme == "file" and not rest.startswith("/"):
            raise ValueError(f"a file:// tokenizer needs an absolute path; got {value!r}")
        return value

    def spec(self) -> dict[str, Any]:
        """The stored form. An unset tokenizer is left out, so a version imported before the
        field existed keeps its content hash (and an approved one can be imported again)."""
        return self.model_dump(exclude={"tokenizer"} if self.tokenizer is None else None)


class KubeflowArtifact(_Lenient):
    artifact_type: str = Field(default="model-artifact", alias="artifactType")
    name: str | None = None
    uri: str | None = None
    digest: str | None = None

    @field_validator("uri")
    @classmethod
    def _scheme(cls, value: str | None) -> str | None:
        if value is None:
            return None
        scheme, sep, rest = value.partition("://")
        if not sep or not rest:
            raise ValueError(f"must be a URI such as oci://registry/repo:tag; got {value!r}")
        if scheme not in ALLOWED_SCHEMES:
            allowed = ", ".join(f"{s}://" for s in ALLOWED_SCHEMES)
            raise ValueError(f"scheme {scheme!r} is not allowed; use one of {allowed}")
        return value

    @field_validator("digest")
    @classmethod
    def _digest(cls, value: str | None) -> str | None:
        if value is not None and not SHA256.match(value):
            raise ValueError("must read sha256:<64 lowercase hex digits>")
        return value

    @model_validator(mode="after")
    def _model_artifact_has_uri(self) -> KubeflowArtifact:
        if self.artifact_type == "model-artifact" and not self.uri:
            raise ValueError("a model artifact needs a uri")
        return self


class KubeflowModel(_Lenient):
    name: AssetName
    version: VersionName | None = None  # Steward extension; Kubeflow models are unversioned
    description: str = Field(default="", max_length=10_000)
    readme: str = Field(default="", max_length=200_000)
    provider: str = Field(default="", max_length=255)
    license: str = Field(default="", max_length=100)
    license_link: str = Field(default="", max_length=2000, alias="licenseLink")
    library_name: str = Field(default="", max_length=100, alias="libraryName")
    maturity: str = Field(default="", max_length=100)
    language: list[str] = []
    tasks: list[str] = []
    tags: list[Tag] = []
    digest: str | None = None
    serving: Serving | None = None
    create_time: Epoch = Field(default=None, alias="createTimeSinceEpoch")
    update_time: Epoch = Field(default=None, alias="lastUpdateTimeSinceEpoch")
    custom_properties: dict[str, Any] | None = Field(default=None, alias="customProperties")
    artifacts: list[KubeflowArtifact] = []

    @field_validator("digest")
    @classmethod
    def _digest(cls, value: str | None) -> str | None:
        if value is not None and not SHA256.match(value):
            raise ValueError("must read sha256:<64 lowercase hex digits>")
        return value


class KubeflowTool(_Lenient):
    name: ToolName
    description: str = Field(default="", max_length=2000)
    access: Access | None = Field(default=None, alias="accessType")


class KubeflowMcpServer(_Lenient):
    name: AssetName
    version: VersionName | None = None
    description: str = Field(default="", max_length=10_000)
    provider: str = Field(default="", max_length=255)
    license: str = Field(default="", max_length=100)
    deployment_mode: Literal["local", "remote"] | None = Field(default=None, alias="deploymentMode")
    transports: list[Literal["stdio", "http", "sse", "streamable-http"]] = []
    endpoints: dict[str, Annotated[str, Field(pattern=r"^https?://\S+$")]] = {}
    tags: list[Tag] = []
    tools: list[KubeflowTool] = []
    security_indicators: dict[str, Any] = Field(default={}, alias="securityIndicators")
    artifacts: list[KubeflowArtifact] = []
    custom_properties: dict[str, Any] | None = Field(default=None, alias="customProperties")
    create_time: Epoch = Field(default=None, alias="createTimeSinceEpoch")
    update_time: Epoch = Field(default=None, alias="lastUpdateTimeSinceEpoch")


class KubeflowCatalog(_Lenient):
    source: str = Field(default="", max_length=255)
    models: list[KubeflowModel] | None = None
    mcp_servers: list[KubeflowMcpServer] | None = None

    @model_validator(mode="after")
    def _has_entries(self) -> KubeflowCatalog:
        if self.models is None and self.mcp_servers is None:
            raise ValueError("a catalog file lists models[] and/or mcp_servers[]")
        return self


# -- MCP registry server.json -----------------------------------------------------------------

_URL_TEMPLATE = r"^(https?://[^\s]+|\{[a-zA-Z_][a-zA-Z0-9_]*\}[^\s]*)$"


class Input(_Lenient):
    description: str | None = None
    is_required: bool = Field(default=False, alias="isRequired")
    is_secret: bool = Field(default=False, alias="isSecret")
    format: Literal["string", "number", "boolean", "filepath"] = "string"
    value: str | None = None
    default: str | None = None
    placeholder: str | None = None
    choices: list[str] | None = None


class InputWithVariables(Input):
    variables: dict[str, Input] | None = None


class KeyValueInput(InputWithVariables):
    name: str = Field(min_length=1)


class PositionalArgument(InputWithVariables):
    type: Literal["positional"]
    value_hint: str | None = Field(default=None, alias="valueHint")
    is_repeated: bool = Field(default=False, alias="isRepeated")

    @model_validator(mode="after")
    def _value_or_hint(self) -> PositionalArgument:
        if self.value is None and self.value_hint is None:
            raise ValueError("a positional argument needs a value or a valueHint")
        return self


class NamedArgument(InputWithVariables):
    type: Literal["named"]
    name: str = Field(min_length=1)
    is_repeated: bool = Field(default=False, alias="isRepeated")


Argument = Annotated[PositionalArgument | NamedArgument, Field(discriminator="type")]


class StdioTransport(_Lenient):
    type: Literal["stdio"]


class StreamableHttpTransport(_Lenient):
    type: Literal["streamable-http"]
    url: str = Field(pattern=_URL_TEMPLATE)
    headers: list[KeyValueInput] = []


class SseTransport(_Lenient):
    type: Literal["sse"]
    url: str = Field(pattern=_URL_TEMPLATE)
    headers: list[KeyValueInput] = []


LocalTransport = Annotated[
    StdioTransport | StreamableHttpTransport | SseTransport, Field(discriminator="type")
]


class StreamableHttpRemote(StreamableHttpTransport):
    variables: dict[str, Input] | None = None


class SseRemote(SseTransport):
    variables: dict[str, Input] | None = None


RemoteTransport = Annotated[StreamableHttpRemote | SseRemote, Field(discriminator="type")]


class Package(_Lenient):
    registry_type: str = Field(min_length=1, alias="registryType")
    registry_base_url: str | None = Field(
        default=None, pattern=r"^https?://\S+$", alias="registryBaseUrl"
    )
    identifier: str = Field(min_length=1)
    version: Annotated[str, Field(min_length=1, max_length=255), AfterValidator(_pinned)] | None = (
        None
    )
    file_sha256: str | None = Field(default=None, pattern=r"^[a-f0-9]{64}$", alias="fileSha256")
    runtime_hint: str | None = Field(default=None, alias="runtimeHint")
    transport: LocalTransport
    runtime_arguments: list[Argument] = Field(default=[], alias="runtimeArguments")
    package_arguments: list[Argument] = Field(default=[], alias="packageArguments")
    environment_variables: list[KeyValueInput] = Field(default=[], alias="environmentVariables")


class Repository(_Lenient):
    url: str = Field(pattern=r"^https?://\S+$")
    source: str = Field(min_length=1)
    id: str | None = None
    subfolder: str | None = None


class Icon(_Lenient):
    src: str = Field(pattern=r"^https://\S+$", max_length=255)
    mime_type: (
        Literal["image/png", "image/jpeg", "image/jpg", "image/svg+xml", "image/webp"] | None
    ) = Field(default=None, alias="mimeType")
    sizes: list[Annotated[str, Field(pattern=r"^(\d+x\d+|any)$")]] | None = None
    theme: Literal["light", "dark"] | None = None


class PublisherTool(_Lenient):
    name: ToolName
    access: Access = Field(default="execute", alias="accessType")


class PublisherProvided(_Lenient):
    """Steward reads ``tags`` and ``tools`` from the publisher-provided metadata."""

    tags: list[Tag] = []
    tools: list[PublisherTool] = []


class ServerJson(_Lenient):
    schema_: str | None = Field(default=None, alias="$schema")
    name: str = Field(min_length=3, max_length=200, pattern=r"^[a-zA-Z0-9.-]+/[a-zA-Z0-9._-]+$")
    description: str = Field(min_length=1, max_length=100)
    version: Annotated[str, Field(min_length=1, max_length=255), AfterValidator(_pinned)]
    title: str | None = Field(default=None, min_length=1, max_length=100)
    website_url: str | None = Field(default=None, pattern=r"^https?://\S+$", alias="websiteUrl")
    repository: Repository | None = None
    icons: list[Icon] = []
    packages: list[Package] = []
    remotes: list[RemoteTransport] = []
    meta: dict[str, Any] = Field(default={}, alias="_meta")

    def publisher(self) -> PublisherProvided:
        return PublisherProvided.model_validate(self.meta.get(PUBLISHER_META) or {})


# -- errors -----------------------------------------------------------------------------------


def _path(prefix: str, loc: Sequence[int | str]) -> str:
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _errors(exc: ValidationError, prefix: str) -> list[dict[str, str]]:
    return [
        {
            "field": _path(prefix, err["loc"]),
            "message": err["msg"].removeprefix("Value error, "),
            "type": err["type"],
        }
        for err in exc.errors()
    ]


def refuse(errors: list[dict[str, str]], what: str) -> Unprocessable:
    shown = "; ".join(f"{e['field'] or 'body'}: {e['message']}" for e in errors[:5])
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return Unprocessable(f"{what} refused, nothing imported: {shown}{more}", errors=errors)


# -- normalisation ----------------------------------------------------------------------------


def _oci_parts(uri: str) -> tuple[str | None, str | None]:
    """(tag, digest) of an ``oci://`` reference."""
    if not uri.startswith("oci://"):
        return None, None
    ref = uri.removeprefix("oci://")
    if "@" in ref:
        digest = ref.rsplit("@", 1)[1]
        return None, digest if SHA256.match(digest) else None
    last = ref.rsplit("/", 1)[-1]
    if ":" in last:
        tag = last.rsplit(":", 1)[1]
        return (tag if _OCI_TAG.match(tag) and tag != "latest" else None), None
    return None, None


def _model_entry(model: KubeflowModel, source: str, where: str) -> Entry:
    uris = [a.uri for a in model.artifacts if a.artifact_type == "model-artifact" and a.uri]
    source_uri = uris[0] if uris else None
    tag, pinned = _oci_parts(source_uri) if source_uri else (None, None)
    artifact_digest = next((a.digest for a in model.artifacts if a.digest), None)
    digest = model.digest or artifact_digest or pinned
    version = model.version or tag or model.update_time or "1"
    spec = {
        "format": "kubeflow-catalog",
        "source_uri": source_uri,
        "artifact_uris": uris,
        "digest": digest,
        "license": model.license,
        "license_link": model.license_link,
        "tasks": model.tasks,
        "language": model.language,
        "library_name": model.library_name,
        "maturity": model.maturity,
        "readme": model.readme,
        "serving": model.serving.spec() if model.serving else None,
        "custom_properties": model.custom_properties or {},
        "metrics_artifacts": sum(a.artifact_type == "metrics-artifact" for a in model.artifacts),
        "updated_at_epoch_ms": model.update_time,
    }
    return Entry(
        kind="model",
        name=model.name,
        version=str(version),
        description=model.description,
        provider=model.provider,
        tags=_tags(model.tags),
        tools=[],
        spec=spec,
        source=source,
        where=where,
        checklist=model_checklist(spec),
    )


def _kubeflow_mcp_entry(server: KubeflowMcpServer, source: str, where: str) -> Entry:
    # Without an explicit access type a tool is assumed to do anything, unless the source
    # vouches that all its tools are read-only.
    read_only = server.security_indicators.get("readOnlyTools") is True
    default: Access = "read_only" if read_only else "execute"
    tools = [ToolRef(name=t.name, access=t.access or default) for t in server.tools]
    spec = {
        "format": "kubeflow-catalog",
        "license": server.license,
        "deployment_mode": server.deployment_mode,
        "transports": server.transports,
        "endpoints": server.endpoints,
        "artifact_uris": [a.uri for a in server.artifacts if a.uri],
        "security_indicators": server.security_indicators,
        "custom_properties": server.custom_properties or {},
        "tool_descriptions": {t.name: t.description for t in server.tools},
    }
    return Entry(
        kind="mcp_server",
        name=server.name,
        version=str(server.version or server.update_time or "1"),
        description=server.description,
        provider=server.provider,
        tags=_tags(server.tags),
        tools=tools,
        spec=spec,
        source=source,
        where=where,
        checklist=mcp_checklist(spec, tools),
    )


def _server_json_entry(server: ServerJson, raw: dict[str, Any], source: str, where: str) -> Entry:
    publisher = server.publisher()
    tools = [ToolRef(name=t.name, access=t.access) for t in publisher.tools]
    spec = {
        "format": "mcp-server.json",
        "server": raw,
        "transports": sorted(
            {p.transport.type for p in server.packages} | {r.type for r in server.remotes}
        ),
        "endpoints": {r.type: r.url for r in server.remotes},
        "packages": [
            {"registry_type": p.registry_type, "identifier": p.identifier, "version": p.version}
            for p in server.packages
        ],
    }
    provider = server.name.split("/", 1)[0]
    return Entry(
        kind="mcp_server",
        name=server.name,
        version=server.version,
        description=server.description,
        provider=provider,
        tags=_tags(publisher.tags),
        tools=tools,
        spec=spec,
        source=source,
        where=where,
        checklist=mcp_checklist(spec, tools),
    )


def _check(check: str, ok: bool, detail: str) -> dict[str, Any]:
    return {"check": check, "ok": ok, "detail": detail}


def model_checklist(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """What a reviewer should see verified before admitting a model version."""
    uri = spec.get("source_uri")
    return [
        _check("provenance", bool(uri), uri or "no model artifact URI"),
        _check("digest", bool(spec.get("digest")), spec.get("digest") or "not pinned by digest"),
        _check("license", bool(spec.get("license")), spec.get("license") or "no licence"),
        _check(
            "license_link",
            bool(spec.get("license_link")),
            spec.get("license_link") or "no licence link",
        ),
    ]


def mcp_checklist(spec: dict[str, Any], tools: Sequence[ToolRef]) -> list[dict[str, Any]]:
    endpoints = list((spec.get("endpoints") or {}).values())
    insecure = [u for u in endpoints if u.startswith("http://")]
    packages = spec.get("packages") or []
    unpinned = [p["identifier"] for p in packages if not p.get("version")]
    return [
        _check(
            "endpoints_https",
            not insecure,
            "all remote endpoints use https" if not insecure else f"plain http: {insecure}",
        ),
        _check(
            "packages_pinned",
            not unpinned,
            "every package pins a version" if not unpinned else f"unpinned: {unpinned}",
        ),
        _check(
            "tools_declared",
            bool(tools),
            f"{len(tools)} tools with access types" if tools else "no tools declared",
        ),
        _check(
            "no_execute_tools",
            not any(t.access == "execute" for t in tools),
            ", ".join(t.name for t in tools if t.access == "execute") or "none may execute",
        ),
    ]


def _unique(entries: list[Entry], errors: list[dict[str, str]]) -> None:
    seen: dict[tuple[str, str, str], str] = {}
    for entry in entries:
        key = (entry.kind, entry.name, entry.version)
        if key in seen:
            errors.append(
                {
                    "field": f"{entry.where}.name",
                    "message": f"{entry.kind} {entry.name!r} version {entry.version!r} "
                    f"is also listed at {seen[key]}",
                    "type": "duplicate",
                }
            )
        else:
            seen[key] = entry.where
        names = [t.name for t in entry.tools]
        if len(set(names)) != len(names):
            errors.append(
                {"field": f"{entry.where}.tools", "message": "tool names repeat", "type": "dup"}
            )


def parse_catalog_yaml(text: str) -> list[Entry]:
    """Every entry of a Kubeflow-shaped catalog file, or a 422 listing every problem."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise refuse(
            [{"field": "", "message": f"not valid YAML{where}: {problem}", "type": "yaml"}],
            "catalog file",
        ) from exc
    if not isinstance(data, dict):
        raise refuse(
            [{"field": "", "message": "must be a YAML mapping", "type": "type"}], "catalog file"
        )
    try:
        catalog = KubeflowCatalog.model_validate(data)
    except ValidationError as exc:
        raise refuse(_errors(exc, ""), "catalog file") from exc
    entries = [
        _model_entry(m, catalog.source, f"models[{i}]") for i, m in enumerate(catalog.models or [])
    ]
    entries += [
        _kubeflow_mcp_entry(s, catalog.source, f"mcp_servers[{i}]")
        for i, s in enumerate(catalog.mcp_servers or [])
    ]
    errors: list[dict[str, str]] = []
    _unique(entries, errors)
    if errors:
        raise refuse(errors, "catalog file")
    return entries


def parse_server_jsons(
    documents: list[Any], *, prefix_index: bool = True, source: str = "server.json"
) -> list[Entry]:
    """Each MCP registry ``server.json`` document, or a 422 naming every bad field (as
    ``[2].packages[0].version``, or ``packages[0].version`` for a single document)."""
    entries: list[Entry] = []
    errors: list[dict[str, str]] = []
    for i, raw in enumerate(documents):
        where = f"[{i}]" if prefix_index else ""
        if not isinstance(raw, dict):
            errors.append({"field": where, "message": "must be a JSON object", "type": "type"})
            continue
        try:
            server = ServerJson.model_validate(raw)
            entries.append(_server_json_entry(server, raw, source, where))
        except ValidationError as exc:
            errors.extend(_errors(exc, where))
    _unique(entries, errors)
    if errors:
        raise refuse(errors, "server.json import")
    return entries
