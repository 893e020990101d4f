"""API-key and JWT verifications per second on one core, as ratios against a bare HMAC loop.

Every figure is measured in this run, next to its baseline, because the machines are shared and
absolute times drift. Run: ``.venv/bin/python bench/authz_verify.py [--seconds 2]``.

- baseline: ``hmac.new(pepper, key, sha256).digest()`` — the floor of any peppered-hash check.
- key (in memory): parse the key, HMAC it, compare in constant time — what a local replica does.
- key (authz, SQLite/PostgreSQL): AuthzResolver.resolve — the above plus a database lookup.
- JWT RS256 / ES256: OIDCVerifier.verify with a warm JWKS cache (signature + claim checks).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import os
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from pydantic import SecretStr

from libs.common import apikeys
from libs.common.db import make_engine, make_sessionmaker
from libs.common.migrate import upgrade_async
from libs.common.oidc import JWKSCache, OIDCVerifier
from libs.common.settings import Settings
from services.authz.app import bootstrap
from services.authz.principals import AuthzResolver, LastUsed


def rate(fn: Callable[[], object], seconds: float) -> float:
    """Calls per second of a synchronous function, in batches to keep the clock out of it."""
    calls, batch = 0, 256
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for _ in range(batch):
            fn()
        calls += batch
    return calls / (time.perf_counter() - start)


async def arate(fn: Callable[[], Awaitable[object]], seconds: float) -> float:
    calls, batch = 0, 64
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for _ in range(batch):
            await fn()
        calls += batch
    return calls / (time.perf_counter() - start)


def jwt_verifier(alg: str) -> tuple[OIDCVerifier, str]:
    if alg == "RS256":
        private: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public_jwk = RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
    else:
        private = ec.generate_private_key(ec.SECP256R1())
        public_jwk = ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
    jwks = {"keys": [{**public_jwk, "kid": "k1", "use": "sig", "alg": alg}]}

    async def fetch() -> dict[str, Any]:
        return jwks

    now = int(time.time())
    claims = {"iss": "https://idp", "aud": "steward", "sub": "u", "exp": now + 3600, "nbf": now}
    token = jwt.encode(claims, private, algorithm=alg, headers={"kid": "k1"})
    cache = JWKSCache(fetch, ttl=3600, min_refresh=30)
    verifier = OIDCVerifier(issuer="https://idp", audience="steward", jwks=cache, algorithms=[alg])
    return verifier, token


@contextlib.asynccontextmanager
async def scratch_postgres() -> AsyncIterator[str | None]:
    """A throw-away database on the local PostgreSQL, or None when none is reachable."""
    dsn = os.environ.get("STEWARD_BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
    name = f"steward_bench_{os.getpid()}"
    try:
        admin = await asyncpg.connect(dsn, timeout=2)
    except (OSError, asyncpg.PostgresError):
        yield None
        return
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        base = dsn.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
        yield f"{base}/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def resolver_rate(database_url: str, data_dir: Path, seconds: float) -> float:
    settings = Settings(
        database_url=database_url,
        data_dir=data_dir,
        api_key_pepper=SecretStr("bench-pepper"),
    )
    await upgrade_async("authz", settings)
    key = await bootstrap(settings)
    assert key is not None
    engine = make_engine(settings.database_url_for("authz"), schema="authz")
    try:
        resolver = AuthzResolver(make_sessionmaker(engine), settings.pepper, None, LastUsed())
        await resolver.resolve(key)
        return await arate(lambda: resolver.resolve(key), seconds)
    finally:
        await engine.dispose()


async def main(seconds: float) -> None:
    pepper = os.urandom(32)
    _, key = apikeys.generate()
    stored = apikeys.digest(pepper, key)
    encoded = key.encode()

    figures: list[tuple[str, float]] = []
    baseline = rate(lambda: hmac.new(pepper, encoded, hashlib.sha256).digest(), seconds)
    figures.append(("baseline: bare hmac.new(...).digest()", baseline))
    figures.append(
        (
            "API key, in memory (parse + HMAC + compare_digest)",
            rate(lambda: apikeys.key_id_of(key) and apikeys.matches(pepper, key, stored), seconds),
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        sqlite = f"sqlite+aiosqlite:///{tmp}/{{service}}.db"
        figures.append(
            ("API key, authz resolver on SQLite", await resolver_rate(sqlite, Path(tmp), seconds))
        )
        async with scratch_postgres() as pg:
            if pg:
                figures.append(
                    (
                        "API key, authz resolver on PostgreSQL",
                        await resolver_rate(pg, Path(tmp), seconds),
                    )
                )
    for alg in ("RS256", "ES256"):
        verifier, token = jwt_verifier(alg)
        await verifier.verify(token)
        figures.append(
            (
                f"JWT {alg}, warm JWKS cache",
                await arate(lambda v=verifier, t=token: v.verify(t), seconds),  # type: ignore[misc]
            )
        )
    # The baseline again, to show how much the machine drifted during the run.
    figures.append(
        (
            "baseline again",
            rate(lambda: hmac.new(pepper, encoded, hashlib.sha256).digest(), seconds),
        )
    )

    print(f"{'what':<52} {'per second':>12} {'vs baseline':>12}")
    for name, value in figures:
        print(f"{name:<52} {value:>12,.0f} {value / baseline:>11.3f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    asyncio.run(main(parser.parse_args().seconds))
