"""Every service's migrations, on SQLite and on PostgreSQL: they go down to nothing and back up
to the same schema, and the schema they build is the one the models describe (what
``alembic check`` says, and what it does not compare).

Each test migrates an empty database of its own (a file in tmp_path, or a PostgreSQL database
created for it), never the shared session fixtures': nothing another test did can hide or cause
a difference, whatever the order.
"""

from __future__ import annotations

import asyncio
import importlib
import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from pprint import pformat
from typing import Any, TypeVar

import asyncpg
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import MetaData, inspect, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import NullPool

from cli.stack import SERVICES
from libs.common.db import is_postgres, make_engine, make_sessionmaker, utcnow
from libs.common.migrate import alembic_config
from libs.common.settings import Settings
from services.inference.models import Endpoint
from tests.helpers import PG_ADMIN_DSN

T = TypeVar("T")


async def _admin(sql: str) -> None:
    connection = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


@pytest.fixture(params=["sqlite", "postgresql"])
async def databases(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Settings]:
    """Empty databases of this test's own, laid out as the services' are: a file per name on
    SQLite, a schema per name in one database on PostgreSQL."""
    if request.param == "sqlite":
        yield Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/{{service}}.db")
        return
    name = f"steward_migrations_{secrets.token_hex(6)}"
    await _admin(f'CREATE DATABASE "{name}"')
    try:
        url = make_url(PG_ADMIN_DSN).set(drivername="postgresql+asyncpg", database=name)
        yield Settings(database_url=url.render_as_string(hide_password=False))
    finally:
        await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _migrate(
    step: Callable[[Config, str], None], databases: Settings, service: str, revision: str
) -> None:
    """Run an alembic command as ``steward migrate`` does, off the event loop (each service's
    env.py runs a loop of its own). Downgrades go through ``command.downgrade``: an "upgrade" to
    base quietly does nothing."""
    config = alembic_config(service, databases.database_url_for(service))
    await asyncio.to_thread(step, config, revision)


async def _look(databases: Settings, name: str, look: Callable[[Connection], T]) -> T:
    """``look`` at the database ``name`` as a service of that name sees it (on PostgreSQL,
    its schema, created if need be as env.py does)."""
    url = databases.database_url_for(name)
    engine = make_engine(url, name, poolclass=NullPool)
    try:
        async with engine.begin() as connection:
            if is_postgres(url):
                await connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{name}"'))
            return await connection.run_sync(look)
    finally:
        await engine.dispose()


def _plain(value: Any) -> Any:
    """Reflected values made comparable: types and SQL clauses become their text."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _by_name(items: list[Any]) -> list[Any]:
    return sorted((_plain(item) for item in items), key=lambda item: str(item.get("name")))


def _schema(connection: Connection) -> dict[str, Any]:
    """What reflection sees of every table."""
    inspector = inspect(connection)
    return {
        table: {
            "columns": _plain(inspector.get_columns(table)),
            "primary key": _plain(inspector.get_pk_constraint(table)),
            "foreign keys": _by_name(inspector.get_foreign_keys(table)),
            "unique constraints": _by_name(inspector.get_unique_constraints(table)),
            "check constraints": _by_name(inspector.get_check_constraints(table)),
            "indexes": _by_name(inspector.get_indexes(table)),
        }
        for table in inspector.get_table_names()
    }


def _revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def _assert_same(left: dict[str, Any], right: dict[str, Any], message: str) -> None:
    """Compare two schemas one column, index or constraint at a time, so that a failure shows
    just the entries that differ."""

    def entries(schema: dict[str, Any]) -> set[str]:
        return {
            f"{table} {part}: {item}"
            for table, parts in schema.items()
            for part, items in parts.items()
            for item in (items if isinstance(items, list) else [items])
        }

    only_left = sorted(entries(left) - entries(right))
    only_right = sorted(entries(right) - entries(left))
    assert not only_left and not only_right, (
        f"{message}\n- {pformat(only_left)}\n+ {pformat(only_right)}"
    )


@pytest.mark.parametrize("service", SERVICES)
async def test_migrations_go_down_to_nothing_and_up_to_the_same_schema(
    service: str, databases: Settings
) -> None:
    """A release can be rolled back: every downgrade runs, leaves no table behind, and the
    upgrade after it builds exactly what the first one built."""
    config = alembic_config(service, databases.database_url_for(service))
    heads = ScriptDirectory.from_config(config).get_heads()
    assert len(heads) == 1, f"{service} has several migration heads: {heads}"

    await _migrate(command.upgrade, databases, service, "head")
    assert await _look(databases, service, _revision) == heads[0]
    first = await _look(databases, service, _schema)

    await _migrate(command.downgrade, databases, service, "base")
    assert await _look(databases, service, _revision) is None
    left = list(await _look(databases, service, _schema))
    assert left == ["alembic_version"], f"the downgrade to base left tables behind: {left}"

    await _migrate(command.upgrade, databases, service, "head")
    second = await _look(databases, service, _schema)
    _assert_same(first, second, "the upgrade after a downgrade built another schema")


def _metadata(service: str) -> MetaData:
    metadata: MetaData = importlib.import_module(f"services.{service}.models").metadata
    return metadata


@pytest.mark.parametrize("service", SERVICES)
async def test_the_models_match_the_migrations(service: str, databases: Settings) -> None:
    """``alembic check``: autogenerate finds nothing between the migrated database and the
    service's models (compare_type=True, as every env.py runs it). A model changed without its
    migration, or a migration without its model, fails here."""
    await _migrate(command.upgrade, databases, service, "head")

    def differences(connection: Connection) -> list[Any]:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(context, _metadata(service)))

    found = await _look(databases, service, differences)
    assert found == [], f"{service}'s models and migrations disagree:\n{pformat(found)}"


@pytest.mark.parametrize("service", SERVICES)
async def test_the_migrations_build_what_the_models_would(
    service: str, databases: Settings
) -> None:
    """What autogenerate does not compare (a partial index's WHERE, server defaults, check
    constraints) must agree too: the migrated schema reflects exactly as the one
    ``create_all`` builds from the models, next to it."""
    await _migrate(command.upgrade, databases, service, "head")
    migrated = await _look(databases, service, _schema)
    del migrated["alembic_version"]

    def create_all(connection: Connection) -> dict[str, Any]:
        _metadata(service).create_all(connection)
        return _schema(connection)

    modelled = await _look(databases, f"{service}_models", create_all)
    _assert_same(migrated, modelled, f"{service}'s migrations (-) and models (+) disagree")


def _endpoint(route: str, status: str = "ready", request_id: str | None = None) -> Endpoint:
    now = utcnow()
    return Endpoint(
        project="p",
        asset_name="m",
        version="1",
        runtime="local",
        replicas=1,
        gpus=0,
        served_model_name="m",
        route_name=route,
        status=status,
        reason="",
        runtime_name="ep-x",
        owner="o",
        request_id=request_id,
        requested_at=now,
        approved_at=now,
    )


async def test_inference_keeps_provisioning_idempotent(databases: Settings) -> None:
    """The constraints that keep provisioning idempotent work on both engines: two live
    endpoints never share a route name (a partial unique index), and one approval never
    provisions two endpoints. Each refused insert is in its own savepoint."""
    await _migrate(command.upgrade, databases, "inference", "head")
    url = databases.database_url_for("inference")
    engine = make_engine(url, "inference", poolclass=NullPool)
    try:
        async with make_sessionmaker(engine)() as session, session.begin():
            session.add(_endpoint("t/route", "deleted"))
            session.add(_endpoint("t/route", "ready"))  # a deleted one frees the name
            await session.flush()
            with pytest.raises(IntegrityError):
                async with session.begin_nested():
                    session.add(_endpoint("t/route", "provisioning"))  # two live: refused
            session.add(_endpoint("t/a", request_id="t-request"))
            await session.flush()
            with pytest.raises(IntegrityError):
                async with session.begin_nested():
                    session.add(_endpoint("t/b", request_id="t-request"))  # one per approval
    finally:
        await engine.dispose()
