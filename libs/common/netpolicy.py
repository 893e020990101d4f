"""Which addresses Steward may connect to on a tenant's say-so (DESIGN §6, §8).

An external endpoint's base URL and an MCP server's remote come from project admins; without a
policy the inference probe and the gateway would fetch whatever they name — cloud metadata,
Steward's own authz, a database on the pod network. The rules, in order:

1. An address is first made canonical: IPv4-mapped (``::ffff:a.b.c.d``), IPv4-compatible
   (``::a.b.c.d``), 6to4 and NAT64 forms are the IPv4 address they carry. Decimal, octal and hex
   spellings (``2852039166``, ``0251.0376.0251.0376``) never reach a check as text: every host is
   resolved by ``getaddrinfo`` and the check sees the resulting address.
2. Link-local, cloud metadata, unspecified, multicast and broadcast addresses are always denied.
3. Steward's own services (every service URL, the gateway's ports, NATS, the database) are never
   upstreams, whatever the allow-list says.
4. Private, loopback, shared (CGNAT) and unique-local ranges are denied unless a network of
   ``STEWARD_UPSTREAM_ALLOWED_NETWORKS`` holds the address. The default allows loopback, so a local
   Ollama or llama.cpp works on the embedded default; a cluster sets its own list.
5. Everything else (public addresses) is allowed.

The check runs at every new connection on the address it resolved, and the connection goes to
that very address (pinned): a name that answers a public address at registration and a private
one later (DNS rebinding) is refused when it turns. A name with any denied answer is refused as a
whole, so an attacker cannot mix answers and hope for the lucky one.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

from libs.common.settings import SERVICE_PORTS, Settings, nats_servers

IPAddress = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network

ALWAYS_DENIED: tuple[Network, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",  # "this network": 0.0.0.0 reaches the local host
        "169.254.0.0/16",  # link-local, cloud metadata (169.254.169.254)
        "100.100.100.200/32",  # Alibaba Cloud metadata
        "192.0.0.0/24",  # IETF protocol assignments (incl. Oracle metadata 192.0.0.192)
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, and the broadcast address
        "::/128",  # unspecified
        "fe80::/10",  # link-local
        "fd00:ec2::254/128",  # AWS metadata over IPv6
        "ff00::/8",  # multicast
    )
)
# Reached only through the allow-list.
GUARDED: tuple[Network, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "127.0.0.0/8",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",  # shared address space (carrier-grade NAT, some pod networks)
        "198.18.0.0/15",  # benchmarking
        "::1/128",
        "fc00::/7",  # unique local
        "fec0::/10",  # deprecated site-local
    )
)
DEFAULT_ALLOWED: tuple[Network, ...] = (IPv4Network("127.0.0.0/8"), IPv6Network("::1/128"))
NAT64 = IPv6Network("64:ff9b::/96")


Resolver = Callable[[str, int], Awaitable[list[str]]]


async def system_resolver(host: str, port: int) -> list[str]:
    """``getaddrinfo``, as a connection would resolve: numeric forms such as ``2852039166``
    come back as the dotted address they mean."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


class AddressDenied(Exception):
    """The upstream's address is not one Steward may connect to; the message says why."""


def canonical(address: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 address carries (mapped, compatible, 6to4, NAT64), else itself."""
    if isinstance(address, IPv4Address):
        return address
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in NAT64:
        return IPv4Address(int(address) & 0xFFFFFFFF)
    value = int(address)
    if 1 < value < 1 << 32:  # IPv4-compatible ::a.b.c.d (:: and ::1 are themselves)
        return IPv4Address(value)
    return address


@dataclass(frozen=True)
class AddressPolicy:
    allowed: tuple[Network, ...] = DEFAULT_ALLOWED
    denied: tuple[Network, ...] = ()  # more networks to deny, beyond ALWAYS_DENIED
    # Steward's own listeners: (address, port); an unspecified or loopback address stands for
    # every loopback address.
    own: frozenset[tuple[IPAddress, int]] = field(default_factory=frozenset)
    # Host name → addresses; the system resolver unless a test injects one.
    resolver: Resolver | None = None

    def verdict(self, address: IPAddress, port: int) -> str | None:
        """Why ``address:port`` may not be connected to, or None when it may."""
        address = canonical(address)
        if any(address in n for n in (*ALWAYS_DENIED, *self.denied)):
            return f"{address} is link-local, metadata or otherwise never an upstream"
        if self._is_own(address, port):
            return f"{address} port {port} is one of Steward's own services"
        if any(address in n for n in GUARDED) and not any(address in n for n in self.allowed):
            return (
                f"{address} is a private or loopback address outside "
                "STEWARD_UPSTREAM_ALLOWED_NETWORKS"
            )
        return None

    def _is_own(self, address: IPAddress, port: int) -> bool:
        for own, own_port in self.own:
            if own_port != port:
                continue
            if own == address or (_local(own) and _local(address)):
                return True
        return False

    async def resolve(self, host: str, port: int) -> IPAddress:
        """The address to connect to for ``host:port``, after checking every address it has.

        Raises ``AddressDenied`` when any is denied, ``OSError`` when the name does not resolve.
        """
        resolve = self.resolver or system_resolver
        addresses = [ipaddress.ip_address(a.split("%")[0]) for a in await resolve(host, port)]
        if not addresses:
            raise OSError(f"{host} has no address")
        for address in addresses:
            reason = self.verdict(address, port)
            if reason is not None:
                raise AddressDenied(f"{host}: {reason}")
        return addresses[0]

    async def check_url(self, url: str) -> None:
        """Refuse a URL whose host is denied now. A name that does not resolve yet passes: every
        connection is checked again (``resolve``) when it is opened."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise AddressDenied(f"{url!r} is not an http(s) URL with a host")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            await self.resolve(parts.hostname, port)
        except OSError:
            return

    def transport(self, **options: Any) -> httpx.AsyncHTTPTransport:
        """An httpx transport whose every new connection is checked and pinned by this policy."""
        transport = httpx.AsyncHTTPTransport(**options)
        # httpx takes no network backend of its own; its httpcore pool does.
        transport._pool._network_backend = _Backend(self)
        return transport


def _local(address: IPAddress) -> bool:
    return address.is_loopback or address.is_unspecified


async def own_addresses(
    urls: Iterable[str], ports: Iterable[int] = ()
) -> set[tuple[IPAddress, int]]:
    """Steward's own listeners from its service URLs (resolved now) and bare local ports."""
    own: set[tuple[IPAddress, int]] = {(IPv4Address("127.0.0.1"), p) for p in ports}
    loop = asyncio.get_running_loop()
    for url in urls:
        parts = urlsplit(url if "//" in url else f"//{url}")
        if not parts.hostname:
            continue
        scheme = parts.scheme
        default = (
            443
            if scheme == "https"
            else 4222
            if scheme.startswith("nats")
            else 5432
            if scheme.startswith("postgres")
            else 80
        )
        port = parts.port or default
        try:
            infos = await loop.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
        except OSError:
            continue
        for info in infos:
            own.add((canonical(ipaddress.ip_address(str(info[4][0]).split("%")[0])), port))
    return own


async def policy_from_settings(settings: Settings, denied: Iterable[Network] = ()) -> AddressPolicy:
    """The policy of this deployment: its allow-list, and every listener of Steward's own."""
    urls = [getattr(settings, f"{service}_url") for service in SERVICE_PORTS]
    urls += [*nats_servers(settings.nats_url), settings.database_url]
    if settings.keycloak_url:
        urls.append(settings.keycloak_url)
    ports = [settings.gateway_proxy_port, settings.gateway_admin_port]
    return AddressPolicy(
        allowed=tuple(settings.upstream_allowed_networks),
        denied=tuple(denied),
        own=frozenset(await own_addresses(urls, ports)),
    )


class _Backend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, connecting only to an address the policy has just checked.
    TLS still verifies the certificate against the URL's host name (httpcore passes it)."""

    def __init__(self, policy: AddressPolicy) -> None:
        self.policy = policy
        self.inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's signature)
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            address = await self.policy.resolve(host, port)
        except AddressDenied as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        except OSError as exc:
            raise httpcore.ConnectError(f"{host}: {exc}") from exc
        return await self.inner.connect_tcp(
            str(address), port, timeout, local_address, socket_options
        )

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are never upstreams")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)
