"""Kong 3.x declarative configuration: the entities, their field names and defaults, validation
with Kong's error wording, and normalisation into flat, referenced, id-carrying entities.

The subset is what the gateway runs: ``services``, ``routes``, ``consumers``,
``keyauth_credentials``, ``acls``, ``jwt_secrets`` and ``plugins`` (``key-auth``, ``jwt``,
``acl``, ``rate-limiting``, and Steward's ``steward-quota``), nested or top-level as Kong allows.
Unknown fields are refused ("unknown field"), as Kong refuses them. Ids missing from the file are
generated the way Kong generates them (UUIDv5 in Kong's namespace over the entity's endpoint key),
so the same file always yields the same ids.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import Iterable
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

FORMAT_VERSIONS = ("1.1", "2.1", "3.0")
HTTP_PROTOCOLS = ("http", "https")
ALL_PROTOCOLS = ("grpc", "grpcs", "http", "https", "tcp", "tls", "tls_passthrough", "udp")
PLUGIN_PROTOCOLS = ["grpc", "grpcs", "http", "https"]
NAME = r"^[\w.~-]+$"  # Kong's typedefs.name: letters, digits, . - _ ~
# Kong's namespace for deterministic entity ids (kong/db/schema/others/declarative_config.lua).
KONG_ENTITIES_NS = uuid.UUID("fd02801f-0957-4a15-a55a-c8d9606f30b5")

Tags = list[str] | None
Ref = str | dict[str, str] | None


class KongModel(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class _Entity(KongModel):
    id: str | None = None
    created_at: int | None = None
    updated_at: int | None = None
    tags: Tags = None


# -- plugins ------------------------------------------------------------------------------------


class KeyAuthConfig(KongModel):
    key_names: list[str] = Field(default_factory=lambda: ["apikey"], min_length=1)
    hide_credentials: bool = False
    anonymous: str | None = None
    key_in_header: bool = True
    key_in_query: bool = True
    key_in_body: bool = False
    run_on_preflight: bool = True
    realm: str | None = None


class JwtConfig(KongModel):
    uri_param_names: list[str] = Field(default_factory=lambda: ["jwt"])
    cookie_names: list[str] = Field(default_factory=list)
    header_names: list[str] = Field(default_factory=lambda: ["authorization"])
    key_claim_name: str = "iss"
    secret_is_base64: bool = False
    claims_to_verify: list[Literal["exp", "nbf"]] | None = None
    anonymous: str | None = None
    run_on_preflight: bool = True
    maximum_expiration: float = Field(default=0, ge=0, le=31536000)
    realm: str | None = None

    @model_validator(mode="after")
    def _expiry_needs_exp(self) -> JwtConfig:
        if self.maximum_expiration > 0 and "exp" not in (self.claims_to_verify or []):
            raise ValueError("claims_to_verify must contain 'exp' when maximum_expiration is set")
        return self


class AclConfig(KongModel):
    allow: list[str] | None = None
    deny: list[str] | None = None
    hide_groups_header: bool = False
    include_consumer_groups: bool = False
    always_use_authenticated_groups: bool = False

    @model_validator(mode="after")
    def _one_list(self) -> AclConfig:
        if (self.allow is None) == (self.deny is None):
            raise ValueError(
                "exactly one of these fields must be non-empty: 'config.allow', 'config.deny'"
            )
        return self


PERIODS = ("second", "minute", "hour", "day", "month", "year")
PERIOD_SECONDS = {
    "second": 1,
    "minute": 60,
    "hour": 3600,
    "day": 86400,
    "month": 2592000,
    "year": 31536000,
}


class RateLimitingConfig(KongModel):
    second: float | None = Field(default=None, gt=0)
    minute: float | None = Field(default=None, gt=0)
    hour: float | None = Field(default=None, gt=0)
    day: float | None = Field(default=None, gt=0)
    month: float | None = Field(default=None, gt=0)
    year: float | None = Field(default=None, gt=0)
    limit_by: Literal[
        "consumer", "credential", "ip", "service", "header", "path", "consumer-group"
    ] = "consumer"
    header_name: str | None = None
    path: str | None = None
    policy: Literal["local", "cluster", "redis"] = "local"
    fault_tolerant: bool = True
    redis_host: str | None = None
    redis_port: int = Field(default=6379, ge=0, le=65535)
    redis_password: str | None = None
    redis_username: str | None = None
    redis_ssl: bool = False
    redis_ssl_verify: bool = False
    redis_server_name: str | None = None
    redis_timeout: float = 2000
    redis_database: int = 0
    hide_client_headers: bool = False
    error_code: float = Field(default=429, gt=0)
    error_message: str = "API rate limit exceeded"
    sync_rate: float = -1

    @model_validator(mode="after")
    def _limits(self) -> RateLimitingConfig:
        values = [(p, getattr(self, p)) for p in PERIODS if getattr(self, p) is not None]
        if not values:
            raise ValueError(
                "at least one of these fields must be non-empty: 'config.second', "
                "'config.minute', 'config.hour', 'config.day', 'config.month', 'config.year'"
            )
        for i, (lower, v1) in enumerate(values):
            for upper, v2 in values[i + 1 :]:
                if v2 < v1:
                    raise ValueError(
                        f"The limit for {upper}({v2:.1f}) cannot be lower than the limit for "
                        f"{lower}({v1:.1f})"
                    )
        if self.policy == "redis" and not self.redis_host:
            raise ValueError("'config.redis_host' is required when 'config.policy' is 'redis'")
        if self.limit_by == "header" and not self.header_name:
            raise ValueError("'config.header_name' is required when 'config.limit_by' is 'header'")
        if self.limit_by == "path" and not self.path:
            raise ValueError("'config.path' is required when 'config.limit_by' is 'path'")
        return self

    def limits(self) -> dict[str, float]:
        return {p: v for p in PERIODS if (v := getattr(self, p)) is not None}


class StewardQuotaConfig(KongModel):
    """Steward's token quota and metering plugin (shipped for real Kong in gateway/kong/)."""

    project: str | None = None
    tokens_per_minute: int | None = Field(default=None, gt=0)
    tokens_per_day: int | None = Field(default=None, gt=0)
    # Where the plugin on real Kong sends usage (the gateway's spool-backed intake or NATS).
    usage_url: str | None = None
    estimate_when_missing: bool = True


class _Plugin(_Entity):
    instance_name: str | None = None
    route: Ref = None
    service: Ref = None
    consumer: Ref = None
    protocols: list[Literal[ALL_PROTOCOLS]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(PLUGIN_PROTOCOLS)
    )
    enabled: bool = True
    ordering: dict[str, Any] | None = None


class KeyAuthPlugin(_Plugin):
    name: Literal["key-auth"]
    config: KeyAuthConfig = Field(default_factory=KeyAuthConfig)


class JwtPlugin(_Plugin):
    name: Literal["jwt"]
    config: JwtConfig = Field(default_factory=JwtConfig)


class AclPlugin(_Plugin):
    name: Literal["acl"]
    config: AclConfig


class RateLimitingPlugin(_Plugin):
    name: Literal["rate-limiting"]
    config: RateLimitingConfig


class StewardQuotaPlugin(_Plugin):
    name: Literal["steward-quota"]
    config: StewardQuotaConfig = Field(default_factory=StewardQuotaConfig)


Plugin = Annotated[
    KeyAuthPlugin | JwtPlugin | AclPlugin | RateLimitingPlugin | StewardQuotaPlugin,
    Field(discriminator="name"),
]
PLUGIN_NAMES = ("key-auth", "jwt", "acl", "rate-limiting", "steward-quota")
CONSUMERLESS_PLUGINS = ("key-auth", "jwt", "acl")


# -- core entities -------------------------------------------------------------------------------


class Route(_Entity):
    name: str | None = Field(default=None, pattern=NAME)
    protocols: list[Literal[ALL_PROTOCOLS]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(HTTP_PROTOCOLS), min_length=1
    )
    methods: list[str] | None = None
    hosts: list[str] | None = None
    paths: list[str] | None = None
    headers: dict[str, list[str]] | None = None
    https_redirect_status_code: Literal[426, 301, 302, 307, 308] = 426
    regex_priority: int = 0
    strip_path: bool = True
    path_handling: Literal["v0", "v1"] = "v0"
    preserve_host: bool = False
    request_buffering: bool = True
    response_buffering: bool = True
    snis: list[str] | None = None
    sources: list[dict[str, Any]] | None = None
    destinations: list[dict[str, Any]] | None = None
    service: Ref = None
    plugins: list[Plugin] = Field(default_factory=list)

    @model_validator(mode="after")
    def _matchable(self) -> Route:
        if set(self.protocols) <= {"http", "https"} and not (
            self.methods or self.hosts or self.paths or self.headers
        ):
            raise ValueError(
                "must set one of 'methods', 'hosts', 'headers', 'paths' when 'protocols' is "
                "'http' or 'https'"
            )
        for path in self.paths or []:
            if not path.startswith(("/", "~")):
                raise ValueError("should start with: / (fixed path) or ~/ (regex path)")
        return self


class Service(_Entity):
    name: str | None = Field(default=None, pattern=NAME)
    retries: int = Field(default=5, ge=0, le=32767)
    protocol: Literal["grpc", "grpcs", "http", "https", "tcp", "tls", "tls_passthrough", "udp"] = (
        "http"
    )
    host: str | None = None
    port: int = Field(default=80, ge=0, le=65535)
    path: str | None = None
    connect_timeout: int = Field(default=60000, ge=1, le=2**31 - 2)
    write_timeout: int = Field(default=60000, ge=1, le=2**31 - 2)
    read_timeout: int = Field(default=60000, ge=1, le=2**31 - 2)
    client_certificate: Ref = None
    tls_verify: bool | None = None
    tls_verify_depth: int | None = Field(default=None, ge=0, le=64)
    ca_certificates: list[str] | None = None
    enabled: bool = True
    url: str | None = Field(default=None, exclude=True)
    routes: list[Route] = Field(default_factory=list)
    plugins: list[Plugin] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _url_shorthand(cls, data: Any) -> Any:
        """Kong's ``url`` shorthand: scheme, host, port and path in one string."""
        if isinstance(data, dict) and isinstance(data.get("url"), str):
            parts = urlsplit(data["url"])
            protocol = parts.scheme or "http"
            data = {
                **data,
                "protocol": protocol,
                "host": parts.hostname,
                "port": parts.port or (443 if protocol == "https" else 80),
                "path": parts.path or None,
            }
        return data

    @model_validator(mode="after")
    def _host(self) -> Service:
        if not self.host:
            raise ValueError("host: required field missing")
        if self.path is not None and not self.path.startswith("/"):
            raise ValueError("path: should start with: /")
        return self


class KeyauthCredential(_Entity):
    consumer: Ref = None
    key: str | None = None
    ttl: int | None = None


class Acl(_Entity):
    consumer: Ref = None
    group: str


class JwtSecret(_Entity):
    consumer: Ref = None
    key: str | None = None
    secret: str | None = None
    rsa_public_key: str | None = None
    algorithm: Literal[
        "HS256",
        "HS384",
        "HS512",
        "RS256",
        "RS384",
        "RS512",
        "ES256",
        "ES384",
        "ES512",
        "PS256",
        "PS384",
        "PS512",
        "EdDSA",
    ] = "HS256"

    @model_validator(mode="after")
    def _rsa_key(self) -> JwtSecret:
        if self.algorithm[:2] in ("RS", "ES", "PS", "Ed") and not self.rsa_public_key:
            raise ValueError(f"rsa_public_key: required for algorithm {self.algorithm}")
        return self


class Consumer(_Entity):
    username: str | None = None
    custom_id: str | None = None
    keyauth_credentials: list[KeyauthCredential] = Field(default_factory=list)
    acls: list[Acl] = Field(default_factory=list)
    jwt_secrets: list[JwtSecret] = Field(default_factory=list)
    plugins: list[Plugin] = Field(default_factory=list)

    @model_validator(mode="after")
    def _identified(self) -> Consumer:
        if not self.username and not self.custom_id:
            raise ValueError(
                "at least one of these fields must be non-empty: 'custom_id', 'username'"
            )
        return self


class DeclarativeConfig(KongModel):
    format_version: Literal["1.1", "2.1", "3.0"] = Field(alias="_format_version")
    transform: bool = Field(default=True, alias="_transform")
    comment: str | None = Field(default=None, alias="_comment")
    ignore: list[Any] | None = Field(default=None, alias="_ignore")
    services: list[Service] = Field(default_factory=list)
    routes: list[Route] = Field(default_factory=list)
    consumers: list[Consumer] = Field(default_factory=list)
    plugins: list[Plugin] = Field(default_factory=list)
    keyauth_credentials: list[KeyauthCredential] = Field(default_factory=list)
    acls: list[Acl] = Field(default_factory=list)
    jwt_secrets: list[JwtSecret] = Field(default_factory=list)


# -- errors ---------------------------------------------------------------------------------------


class InvalidConfig(Exception):
    """Kong's "invalid declarative configuration" (code 14), with its nested ``fields``."""

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields
        super().__init__("declarative config is invalid: " + json.dumps(fields, sort_keys=True))

    def body(self) -> dict[str, Any]:
        return {
            "code": 14,
            "name": "invalid declarative configuration",
            "message": str(self),
            "fields": self.fields,
        }


_MESSAGES = {
    "extra_forbidden": "unknown field",
    "missing": "required field missing",
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "int_from_float": "expected an integer",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "bool_type": "expected a boolean",
    "bool_parsing": "expected a boolean",
    "string_type": "expected a string",
    "list_type": "expected an array",
    "dict_type": "expected a record",
    "model_type": "expected a record",
    "model_attributes_type": "expected a record",
}


def _message(error: Any) -> str:
    kind = str(error["type"])
    if kind in _MESSAGES:
        return _MESSAGES[kind]
    if kind == "literal_error":
        expected = str(error.get("ctx", {}).get("expected", ""))
        return "expected one of: " + expected.replace("'", "").replace(" or ", ", ")
    if kind == "union_tag_invalid":
        tag = error.get("ctx", {}).get("tag", "")
        return f"plugin '{tag}' not enabled; add it to the 'plugins' configuration property"
    if kind == "union_tag_not_found":
        return "required field missing"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return "value should be " + str(error["msg"]).removeprefix("Input should be ")
    if kind == "string_pattern_mismatch":
        return "invalid value: must only contain alphanumerics or '-', '.', '_', '~'"
    message: str = error["msg"]
    return message.removeprefix("Value error, ")


def _nest(fields: dict[str, Any], loc: Iterable[Any], message: str) -> None:
    """Place ``message`` at ``loc`` in Kong's nested error shape (arrays by position)."""
    path = [p for p in loc if p not in PLUGIN_NAMES]
    node: Any = fields
    for i, part in enumerate(path):
        last = i == len(path) - 1
        if isinstance(node, list):
            assert isinstance(part, int)
            while len(node) <= part:
                node.append(None)
            if last:
                node[part] = message
                return
            if not isinstance(node[part], dict):
                node[part] = {}
            node = node[part]
            continue
        key = str(part)
        if last and key == "@entity":
            node.setdefault(key, []).append(message)
            return
        if last:
            existing = node.get(key)
            if existing is None:
                node[key] = message
            elif isinstance(existing, dict):
                existing.setdefault("@entity", []).append(message)
            return
        nxt = path[i + 1]
        if key not in node or not isinstance(node[key], list | dict):
            node[key] = [] if isinstance(nxt, int) else {}
        node = node[key]
    if isinstance(node, dict):
        node.setdefault("@entity", []).append(message)


def _from_validation(exc: ValidationError) -> InvalidConfig:
    fields: dict[str, Any] = {}
    for error in exc.errors():
        loc = [p for p in error["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
            loc.append("name")  # Kong reports an unknown plugin on its name
        _nest(fields, loc, _message(error))
    return InvalidConfig(fields)


# -- normalisation ---------------------------------------------------------------------------

ENTITY_TYPES = (
    "services",
    "routes",
    "consumers",
    "plugins",
    "keyauth_credentials",
    "acls",
    "jwt_secrets",
)
NESTED = {"routes", "plugins", "keyauth_credentials", "acls", "jwt_secrets"}


def entity_id(kind: str, key: str) -> str:
    """Kong's deterministic id: UUIDv5(UUIDv5(Kong's namespace, entity type), endpoint key)."""
    return str(uuid.uuid5(uuid.uuid5(KONG_ENTITIES_NS, kind), key))


class KongConfig:
    """The validated configuration as flat lists of entities (Kong's admin API shape)."""

    def __init__(self, entities: dict[str, list[dict[str, Any]]], format_version: str) -> None:
        self.entities = entities
        self.format_version = format_version

    def __getitem__(self, kind: str) -> list[dict[str, Any]]:
        return self.entities[kind]

    def find(self, kind: str, key: str) -> dict[str, Any] | None:
        endpoint = {"services": "name", "routes": "name", "consumers": "username"}.get(kind)
        for entity in self.entities[kind]:
            if entity["id"] == key or (endpoint and entity.get(endpoint) == key):
                return entity
        return None

    def to_declarative(self) -> dict[str, Any]:
        """Back to a kong.yml document: flat entities, references by name where there is one."""
        names = {
            kind: {e["id"]: e.get(attr) or e["id"] for e in self.entities[kind]}
            for kind, attr in (("services", "name"), ("routes", "name"), ("consumers", "username"))
        }
        out: dict[str, Any] = {"_format_version": "3.0", "_transform": True}
        for kind in ENTITY_TYPES:
            items = []
            for entity in self.entities[kind]:
                item = {k: _prune(v) for k, v in entity.items() if v is not None and k not in _AUTO}
                for ref, refkind in (
                    ("service", "services"),
                    ("route", "routes"),
                    ("consumer", "consumers"),
                ):
                    if isinstance(item.get(ref), dict):
                        item[ref] = names[refkind].get(item[ref]["id"], item[ref]["id"])
                items.append(item)
            if items:
                out[kind] = items
        return out


_AUTO = ("created_at", "updated_at")


def _prune(value: Any) -> Any:
    """Drop nulls inside records (plugin configs), as deck does when it dumps a config."""
    if isinstance(value, dict):
        return {k: _prune(v) for k, v in value.items() if v is not None}
    return value


def parse(data: Any) -> KongConfig:
    """Validate a declarative config (already decoded from YAML/JSON) and normalise it."""
    if not isinstance(data, dict):
        raise InvalidConfig({"@entity": ["expected a declarative configuration object"]})
    try:
        config = DeclarativeConfig.model_validate(data)
    except ValidationError as exc:
        raise _from_validation(exc) from None
    return _normalise(config)


def _dump(model: BaseModel) -> dict[str, Any]:
    data = model.model_dump(mode="json", exclude=NESTED)
    return data


def _normalise(config: DeclarativeConfig) -> KongConfig:
    entities: dict[str, list[dict[str, Any]]] = {k: [] for k in ENTITY_TYPES}
    errors: dict[str, Any] = {}

    def fail(kind: str, index: int, field: str, message: str) -> None:
        _nest(errors, [kind, index, field], message)

    def add(kind: str, model: BaseModel, **parent: dict[str, str]) -> dict[str, Any]:
        item = _dump(model)
        for key, value in parent.items():
            item[key] = value
        entities[kind].append(item)
        return item

    def add_plugins(plugins: list[Any], **parent: dict[str, str]) -> None:
        for plugin in plugins:
            add("plugins", plugin, **parent)

    for service in config.services:
        item = add("services", service)
        item["id"] = item["id"] or entity_id("services", item["name"] or secrets.token_hex(8))
        ref = {"id": item["id"]}
        for route in service.routes:
            if route.service is not None:
                fail(
                    "services",
                    len(entities["services"]) - 1,
                    "routes",
                    "service: value must be null",
                )
            add("routes", route, service=ref)
        add_plugins(service.plugins, service=ref)
    for route in config.routes:
        add("routes", route)
    for route_model, route_item in zip(
        [*(r for s in config.services for r in s.routes), *config.routes],
        entities["routes"],
        strict=True,
    ):
        route_id = route_item["id"] or entity_id(
            "routes", route_item["name"] or secrets.token_hex(8)
        )
        route_item["id"] = route_id
        add_plugins(route_model.plugins, route={"id": route_id})
    for consumer in config.consumers:
        item = add("consumers", consumer)
        key = item["username"] or item["custom_id"]
        item["id"] = item["id"] or entity_id("consumers", key)
        ref = {"id": item["id"]}
        for credential in consumer.keyauth_credentials:
            add("keyauth_credentials", credential, consumer=ref)
        for acl in consumer.acls:
            add("acls", acl, consumer=ref)
        for secret in consumer.jwt_secrets:
            add("jwt_secrets", secret, consumer=ref)
        add_plugins(consumer.plugins, consumer=ref)
    for plugin in config.plugins:
        add("plugins", plugin)
    for credential in config.keyauth_credentials:
        add("keyauth_credentials", credential)
    for acl in config.acls:
        add("acls", acl)
    for secret in config.jwt_secrets:
        add("jwt_secrets", secret)

    _check_unique(entities, errors)
    _resolve(entities, errors)
    _fill_ids(entities)
    now = int(time.time())
    for items in entities.values():
        for entity in items:
            entity["created_at"] = entity.get("created_at") or now
            if "updated_at" in entity:
                entity["updated_at"] = entity.get("updated_at") or now
    for index, plugin_item in enumerate(entities["plugins"]):
        if plugin_item["name"] in CONSUMERLESS_PLUGINS and plugin_item.get("consumer"):
            fail("plugins", index, "consumer", "value must be null")
    if errors:
        raise InvalidConfig(errors)
    return KongConfig(entities, config.format_version)


def _check_unique(entities: dict[str, list[dict[str, Any]]], errors: dict[str, Any]) -> None:
    for kind, attr in (
        ("services", "name"),
        ("routes", "name"),
        ("consumers", "username"),
        ("consumers", "custom_id"),
        ("keyauth_credentials", "key"),
        ("jwt_secrets", "key"),
    ):
        seen: set[str] = set()
        for index, entity in enumerate(entities[kind]):
            value = entity.get(attr)
            if value is None:
                continue
            if value in seen:
                _nest(
                    errors,
                    [kind, index, "@entity"],
                    f"uniqueness violation: '{kind}' entity with {attr} set to '{value}' "
                    "already declared",
                )
            seen.add(value)


def _resolve(entities: dict[str, list[dict[str, Any]]], errors: dict[str, Any]) -> None:
    """Turn references by name or id into ``{"id": …}``; report the ones that lead nowhere."""
    index = {
        "services": {
            **{e["id"]: e["id"] for e in entities["services"] if e["id"]},
            **{e["name"]: e["id"] for e in entities["services"] if e.get("name")},
        },
        "routes": {
            **{e["id"]: e["id"] for e in entities["routes"] if e["id"]},
            **{e["name"]: e["id"] for e in entities["routes"] if e.get("name")},
        },
        "consumers": {
            **{e["id"]: e["id"] for e in entities["consumers"] if e["id"]},
            **{e["username"]: e["id"] for e in entities["consumers"] if e.get("username")},
        },
    }
    refs = {"service": "services", "route": "routes", "consumer": "consumers"}
    for kind, items in entities.items():
        for position, entity in enumerate(items):
            for field, target in refs.items():
                value = entity.get(field)
                if value is None:
                    continue
                key = value.get("id") if isinstance(value, dict) else value
                resolved = index[target].get(str(key))
                if resolved is None:
                    _nest(
                        errors,
                        [kind, position, "@entity"],
                        f"invalid reference '{field}: {key}' (no such entry in '{target}')",
                    )
                else:
                    entity[field] = {"id": resolved}


def _fill_ids(entities: dict[str, list[dict[str, Any]]]) -> None:
    """Ids for entities without an endpoint key, and Kong's generated credential secrets."""
    for credential in entities["keyauth_credentials"]:
        credential["key"] = credential.get("key") or secrets.token_urlsafe(24)
        credential["id"] = credential["id"] or entity_id("keyauth_credentials", credential["key"])
    for secret in entities["jwt_secrets"]:
        secret["key"] = secret.get("key") or secrets.token_hex(16)
        if secret.get("secret") is None and secret["algorithm"].startswith("HS"):
            secret["secret"] = secrets.token_hex(16)
        secret["id"] = secret["id"] or entity_id("jwt_secrets", secret["key"])
    for acl in entities["acls"]:
        consumer = acl["consumer"]["id"] if acl.get("consumer") else ""
        acl["id"] = acl["id"] or entity_id("acls", f"{consumer}:{acl['group']}")
    for plugin in entities["plugins"]:
        scope = ":".join(
            (plugin.get(k) or {}).get("id", "") for k in ("route", "service", "consumer")
        )
        plugin["id"] = plugin["id"] or entity_id(
            "plugins", f"{plugin['name']}:{scope}:{plugin.get('instance_name') or ''}"
        )
