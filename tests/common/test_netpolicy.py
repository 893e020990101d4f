"""The upstream address policy: every spelling of a denied address is denied, at registration
and at each connection, and a connection goes to the very address that was checked."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

import httpx
import pytest

from gateway.upstream import UpstreamDenied, UpstreamPool
from libs.common.netpolicy import (
    AddressDenied,
    AddressPolicy,
    canonical,
    own_addresses,
    policy_from_settings,
)
from libs.common.settings import Settings
from tests.gateway.upstream import app as upstream_app
from tests.helpers import serve

OWN_PORT = 8101  # "authz" in these tables
POLICY = AddressPolicy(own=frozenset({(ipaddress.ip_address("127.0.0.1"), OWN_PORT)}))


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://169.254.169.254/latest", "link-local"),
        ("http://[::ffff:169.254.169.254]/v1", "link-local"),  # IPv4-mapped
        ("http://[::ffff:a9fe:a9fe]/v1", "link-local"),  # the same, in hex
        ("http://[::169.254.169.254]/v1", "link-local"),  # IPv4-compatible
        ("http://[2002:a9fe:a9fe::1]/v1", "link-local"),  # 6to4
        ("http://[64:ff9b::a9fe:a9fe]/v1", "link-local"),  # NAT64
        ("http://2852039166/v1", "link-local"),  # decimal
        ("http://0251.0376.0251.0376/v1", "link-local"),  # octal
        ("http://0xa9.0xfe.0xa9.0xfe/v1", "link-local"),  # hex
        ("http://169.254.43518/v1", "link-local"),  # two-part form
        ("http://[fe80::1]/v1", "link-local"),
        ("http://[fd00:ec2::254]/v1", "link-local"),
        ("http://100.100.100.200/v1", "link-local"),
        ("http://0.0.0.0:8080/v1", "link-local"),
        ("http://[::]:8080/v1", "link-local"),
        ("http://224.0.0.1/v1", "link-local"),
        (f"http://127.0.0.1:{OWN_PORT}/v1", "Steward's own"),
        (f"http://[::ffff:127.0.0.1]:{OWN_PORT}/v1", "Steward's own"),
        (f"http://127.1.2.3:{OWN_PORT}/v1", "Steward's own"),
        (f"http://localhost:{OWN_PORT}/v1", "Steward's own"),
        (f"http://2130706433:{OWN_PORT}/v1", "Steward's own"),  # 127.0.0.1 in decimal
        ("http://10.0.0.7/v1", "private or loopback"),
        ("http://[::ffff:10.0.0.7]/v1", "private or loopback"),
        ("http://192.168.1.1/v1", "private or loopback"),
        ("http://172.16.0.1/v1", "private or loopback"),
        ("http://100.64.0.1/v1", "private or loopback"),
        ("http://[fd12::1]/v1", "private or loopback"),
        ("ftp://example.com/v1", r"not an http\(s\) URL"),
    ],
)
async def test_every_spelling_of_a_denied_address_is_refused(url: str, why: str) -> None:
    with pytest.raises(AddressDenied, match=why):
        await POLICY.check_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:11434/v1",  # a local Ollama: loopback is allowed by default
        "http://[::1]:8080/v1",
        "https://93.184.216.34/v1",  # public
        "http://[2606:4700::1111]/v1",
        "http://no-such-host.invalid/v1",  # unresolvable now: checked again at each connection
    ],
)
async def test_allowed_addresses_pass(url: str) -> None:
    await POLICY.check_url(url)


async def test_the_allow_list_opens_a_private_network_and_nothing_else() -> None:
    policy = AddressPolicy(allowed=(ipaddress.ip_network("10.1.0.0/16"),))
    await policy.check_url("http://10.1.2.3/v1")
    for url in ("http://10.2.0.1/v1", "http://127.0.0.1:11434/v1"):
        with pytest.raises(AddressDenied):
            await policy.check_url(url)
    # Never the metadata address, whatever the list says.
    everything = AddressPolicy(allowed=(ipaddress.ip_network("0.0.0.0/0"),))
    with pytest.raises(AddressDenied):
        await everything.check_url("http://169.254.169.254/")


def test_canonical_forms() -> None:
    ip = ipaddress.ip_address
    assert canonical(ip("::ffff:1.2.3.4")) == ip("1.2.3.4")
    assert canonical(ip("::1.2.3.4")) == ip("1.2.3.4")
    assert canonical(ip("2002:0102:0304::")) == ip("1.2.3.4")
    assert canonical(ip("64:ff9b::102:304")) == ip("1.2.3.4")
    assert canonical(ip("::1")) == ip("::1")
    assert canonical(ip("2606:4700::1111")) == ip("2606:4700::1111")


async def test_any_denied_answer_denies_the_name() -> None:
    async def mixed(host: str, port: int) -> list[str]:
        return ["93.184.216.34", "169.254.169.254"]

    with pytest.raises(AddressDenied):
        await AddressPolicy(resolver=mixed).resolve("mixed.example", 80)


async def test_own_listeners_come_from_the_settings(settings: Settings) -> None:
    configured = settings.model_copy(
        update={"authz_url": "http://localhost:9911", "gateway_proxy_port": 9912}
    )
    policy = await policy_from_settings(configured)
    for port in (9911, 9912):
        assert policy.verdict(ipaddress.ip_address("127.0.0.1"), port) is not None
    assert policy.verdict(ipaddress.ip_address("127.0.0.1"), 9913) is None
    own = await own_addresses(["postgresql+asyncpg://db.invalid/x", "nats://127.0.0.1"])
    assert own == {(ipaddress.ip_address("127.0.0.1"), 4222)}


class Rebinding:
    """A name that answers an allowed address first and a denied one afterwards."""

    def __init__(self, first: str, then: str) -> None:
        self.answers: Iterator[str] = iter([first])
        self.then = then
        self.asked = 0

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked += 1
        return [next(self.answers, self.then)]


async def test_the_gateway_checks_every_connection_and_connects_to_the_checked_address() -> None:
    async with serve(upstream_app) as base:
        port = httpx.URL(base).port
        rebinding = Rebinding("127.0.0.1", "10.9.9.9")
        policy = AddressPolicy(resolver=rebinding)
        pool = UpstreamPool(connect_timeout=5.0, read_timeout=5.0, policy=policy)
        url = f"http://rebinding.example:{port}/_stats"
        try:
            # The name resolves nowhere real: the connection reached the address just checked.
            response = await pool.request("GET", url, [], b"", guarded=True)
            assert response.status == 200
            await response.read()
            response.close()
            pool.close()  # the next request needs a new connection, so a new check
            with pytest.raises(UpstreamDenied, match=r"10\.9\.9\.9"):
                await pool.request("GET", url, [], b"", guarded=True)
            assert rebinding.asked == 2
            # An operator-declared (trusted) origin is not subject to the tenant policy.
            trusted = await pool.request("GET", f"http://127.0.0.1:{port}/_stats", [], b"")
            assert trusted.status == 200
            await trusted.read()
            trusted.close()
        finally:
            pool.close()


async def test_the_probe_client_is_pinned_too() -> None:
    async with serve(upstream_app) as base:
        port = httpx.URL(base).port
        rebinding = Rebinding("127.0.0.1", "169.254.169.254")
        transport = AddressPolicy(resolver=rebinding).transport()
        async with httpx.AsyncClient(transport=transport) as client:
            url = f"http://rebinding.example:{port}/_stats"
            assert (await client.get(url)).status_code == 200
        async with httpx.AsyncClient(transport=AddressPolicy(resolver=rebinding).transport()) as c:
            with pytest.raises(httpx.ConnectError, match="link-local"):
                await c.get(url)
