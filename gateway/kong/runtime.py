"""Running a Kong declarative config: the router, the plugins, and Kong's headers and messages.

A config is compiled once (``KongRuntime``) when it is loaded; a request then costs a walk over
the compiled routes and a few dictionary lookups. ``POST /config`` builds a new runtime and swaps
the reference, so requests in flight finish on the config they started with.
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode

import jwt

from gateway.admission import Refusal
from gateway.kong.schema import PERIOD_SECONDS, KongConfig, RateLimitingConfig

# Kong's plugin priorities decide the order they run in: higher first.
AUTH_ORDER = ("jwt", "key-auth")


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    route: dict[str, Any]
    service: dict[str, Any]
    methods: frozenset[str] | None
    hosts: tuple[str, ...] | None
    prefixes: tuple[str, ...]
    regexes: tuple[re.Pattern[str], ...]


@dataclass(slots=True)
class Match:
    compiled: CompiledRoute
    matched: str  # the part of the path the route matched (stripped when strip_path)

    @property
    def route(self) -> dict[str, Any]:
        return self.compiled.route

    @property
    def service(self) -> dict[str, Any]:
        return self.compiled.service


@dataclass(slots=True)
class Identity:
    consumer: dict[str, Any] | None = None
    credential_id: str | None = None
    anonymous: bool = False
    groups: list[str] = field(default_factory=list)


class RateCounters:
    """Kong's ``local`` policy: fixed windows per period, in this process's memory."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str, str], tuple[int, float]] = {}

    def check(
        self, plugin_id: str, identifier: str, config: RateLimitingConfig, now: float
    ) -> tuple[bool, dict[str, str]]:
        """Count this request; returns (allowed, headers for the client)."""
        headers: dict[str, str] = {}
        allowed = True
        tightest: tuple[float, float, int] | None = None  # (remaining, limit, reset)
        updates: list[tuple[tuple[str, str, str], tuple[int, float]]] = []
        for period, limit in config.limits().items():
            size = PERIOD_SECONDS[period]
            window = now - now % size
            key = (plugin_id, identifier, period)
            count, started = self._counts.get(key, (0, window))
            if started != window:
                count = 0
            used = count + 1
            remaining = max(limit - used, 0)
            reset = int(window + size - now) or 1
            if used > limit:
                allowed = False
                remaining = 0
            updates.append((key, (used, window)))
            title = period.capitalize()
            headers[f"X-RateLimit-Limit-{title}"] = _number(limit)
            headers[f"X-RateLimit-Remaining-{title}"] = _number(remaining)
            if tightest is None or remaining < tightest[0]:
                tightest = (remaining, limit, reset)
        if allowed:
            for key, value in updates:
                self._counts[key] = value
        assert tightest is not None
        headers["RateLimit-Limit"] = _number(tightest[1])
        headers["RateLimit-Remaining"] = _number(tightest[0])
        headers["RateLimit-Reset"] = str(tightest[2])
        if not allowed:
            headers["Retry-After"] = str(tightest[2])
        return allowed, headers


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


class KongRuntime:
    def __init__(self, config: KongConfig) -> None:
        self.config = config
        services = {s["id"]: s for s in config["services"]}
        self.consumers = {c["id"]: c for c in config["consumers"]}
        self.keys = {c["key"]: c for c in config["keyauth_credentials"]}
        self.jwt_secrets = {s["key"]: s for s in config["jwt_secrets"]}
        self.groups: dict[str, list[str]] = {}
        for acl in config["acls"]:
            self.groups.setdefault(acl["consumer"]["id"], []).append(acl["group"])
        self.plugins: dict[tuple[str, str | None, str | None, str | None], dict[str, Any]] = {}
        for plugin in config["plugins"]:
            if not plugin.get("enabled", True):
                continue
            scope = tuple((plugin.get(k) or {}).get("id") for k in ("route", "service", "consumer"))
            self.plugins[(plugin["name"], *scope)] = plugin
        compiled: list[CompiledRoute] = []
        for route in config["routes"]:
            service = services.get((route.get("service") or {}).get("id", ""))
            if service is None or not service.get("enabled", True):
                continue
            paths = route.get("paths") or []
            compiled.append(
                CompiledRoute(
                    route=route,
                    service=service,
                    methods=frozenset(m.upper() for m in route["methods"])
                    if route.get("methods")
                    else None,
                    hosts=tuple(h.lower() for h in route["hosts"]) if route.get("hosts") else None,
                    prefixes=tuple(
                        sorted((p for p in paths if not p.startswith("~")), key=len, reverse=True)
                    ),
                    regexes=tuple(re.compile(p[1:]) for p in paths if p.startswith("~")),
                )
            )
        # Regex routes first (by regex_priority), then the longest prefix wins.
        self.routes = sorted(
            compiled,
            key=lambda c: (
                bool(c.regexes),
                c.route.get("regex_priority", 0),
                max((len(p) for p in c.prefixes), default=0),
            ),
            reverse=True,
        )
        self.counters = RateCounters()

    # -- routing ------------------------------------------------------------------------------

    def match(self, method: str, host: str, path: str) -> Match | None:
        host = host.split(":", 1)[0].lower()
        best: Match | None = None
        for compiled in self.routes:
            if compiled.methods is not None and method not in compiled.methods:
                continue
            if compiled.hosts is not None and not any(
                _host_matches(h, host) for h in compiled.hosts
            ):
                continue
            if not compiled.prefixes and not compiled.regexes:
                return Match(compiled, "")
            for regex in compiled.regexes:
                found = regex.match(path)
                if found:
                    return Match(compiled, found.group(0))
            for prefix in compiled.prefixes:
                if path.startswith(prefix) and (best is None or len(prefix) > len(best.matched)):
                    best = Match(compiled, prefix)
                    break
        return best

    def plugin(
        self, name: str, route: str | None, service: str | None, consumer: str | None = None
    ) -> dict[str, Any] | None:
        """The most specific enabled instance of a plugin for this route, service and consumer."""
        for key in (
            (name, route, service, consumer),
            (name, route, None, consumer),
            (name, None, service, consumer),
            (name, None, None, consumer),
            (name, route, service, None),
            (name, route, None, None),
            (name, None, service, None),
            (name, None, None, None),
        ):
            found = self.plugins.get(key)
            if found is not None:
                return found
        return None

    # -- authentication plugins ---------------------------------------------------------------

    def key_auth(
        self, config: Mapping[str, Any], headers: dict[str, str], query: dict[str, str]
    ) -> Identity:
        key: str | None = None
        source: tuple[str, str] | None = None
        if config.get("key_in_header", True):
            for name in config["key_names"]:
                if headers.get(name.lower()):
                    key, source = headers[name.lower()], ("header", name.lower())
                    break
        if key is None and config.get("key_in_query", True):
            for name in config["key_names"]:
                if query.get(name):
                    key, source = query[name], ("query", name)
                    break
        realm = config.get("realm") or "kong"
        challenge = {"WWW-Authenticate": f'Key realm="{realm}"'}
        if key is None:
            return self._anonymous(
                config, Refusal(401, "No API key found in request", headers=challenge)
            )
        credential = self.keys.get(key)
        if credential is None:
            return self._anonymous(
                config, Refusal(401, "Invalid authentication credentials", headers=challenge)
            )
        if config.get("hide_credentials") and source is not None:
            (headers if source[0] == "header" else query).pop(source[1], None)
        consumer = self.consumers[credential["consumer"]["id"]]
        return Identity(consumer=consumer, credential_id=credential["id"])

    def jwt_auth(
        self,
        config: Mapping[str, Any],
        headers: dict[str, str],
        query: dict[str, str],
        cookies: dict[str, str],
    ) -> Identity:
        tokens: list[str] = [query[n] for n in config["uri_param_names"] if query.get(n)]
        tokens += [cookies[n] for n in config["cookie_names"] if cookies.get(n)]
        for name in config["header_names"]:
            value = headers.get(name.lower())
            if value:
                scheme, _, rest = value.partition(" ")
                if scheme.lower() == "bearer" and rest:
                    tokens.append(rest.strip())
        if not tokens:
            return self._anonymous(config, Refusal(401, "Unauthorized"))
        if len(set(tokens)) > 1:
            raise Refusal(401, "Multiple tokens provided")
        token = tokens[0]
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise Refusal(401, f"Bad token; {exc}") from None
        claim = config["key_claim_name"]
        if claim not in claims:
            raise Refusal(401, f"No mandatory '{claim}' in claims")
        if not claims[claim]:
            raise Refusal(401, f"Invalid '{claim}' in claims")
        secret = self.jwt_secrets.get(str(claims[claim]))
        if secret is None:
            raise Refusal(401, f"No credentials found for given '{claim}'")
        if header.get("alg") != secret["algorithm"]:
            raise Refusal(403, "Invalid algorithm")
        if secret["algorithm"].startswith("HS"):
            key: Any = secret["secret"] or ""
            if config.get("secret_is_base64"):
                key = base64.b64decode(key)
        else:
            key = secret["rsa_public_key"]
        try:
            jwt.decode(
                token,
                key,
                algorithms=[secret["algorithm"]],
                options={
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_aud": False,
                    "verify_iss": False,
                    "verify_iat": False,
                },
            )
        except jwt.PyJWTError:
            raise Refusal(401, "Invalid signature") from None
        errors = _verify_claims(claims, config.get("claims_to_verify") or [])
        if errors:
            raise Refusal(401, errors)
        maximum = config.get("maximum_expiration") or 0
        if maximum > 0 and float(claims.get("exp", 0)) - time.time() > maximum:
            raise Refusal(401, {"exp": "exceeds maximum allowed expiration"})
        consumer = self.consumers[secret["consumer"]["id"]]
        return Identity(consumer=consumer, credential_id=secret["key"])

    def _anonymous(self, config: Mapping[str, Any], error: Refusal) -> Identity:
        anonymous = config.get("anonymous")
        if not anonymous:
            raise error
        consumer = self.consumers.get(anonymous) or next(
            (c for c in self.consumers.values() if c.get("username") == anonymous), None
        )
        if consumer is None:
            raise Refusal(500, "An unexpected error occurred")
        return Identity(consumer=consumer, anonymous=True)

    # -- acl -------------------------------------------------------------------------------------

    def acl(self, config: Mapping[str, Any], identity: Identity) -> None:
        if identity.consumer is None:
            raise Refusal(401, "Unauthorized")
        groups = self.groups.get(identity.consumer["id"], [])
        identity.groups = groups
        allow, deny = config.get("allow"), config.get("deny")
        if allow is not None and not set(allow) & set(groups):
            raise Refusal(403, "You cannot consume this service")
        if deny is not None and set(deny) & set(groups):
            raise Refusal(403, "You cannot consume this service")


def _host_matches(pattern: str, host: str) -> bool:
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    if pattern.endswith(".*"):
        return host.startswith(pattern[:-1])
    return pattern == host


def _verify_claims(claims: Mapping[str, Any], verify: list[str]) -> dict[str, str]:
    errors: dict[str, str] = {}
    now = time.time()
    for name in verify:
        value = claims.get(name)
        if value is None:
            errors[name] = "must be a number"
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            errors[name] = "must be a number"
            continue
        if name == "exp" and number <= now:
            errors[name] = "token expired"
        if name == "nbf" and number > now:
            errors[name] = "token not valid yet"
    return errors


def split_query(raw: bytes) -> dict[str, str]:
    return dict(parse_qsl(raw.decode("latin-1"), keep_blank_values=True))


def join_query(query: Mapping[str, str]) -> str:
    return urlencode(list(query.items()))


def cookies_of(header: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in (header or "").split(";"):
        name, _, value = part.strip().partition("=")
        if name:
            out[name] = value
    return out
