"""Per-service alembic migrations, runnable on SQLite and PostgreSQL alike.

There is no alembic.ini: the configuration is built here, so ``steward migrate`` and the tests
run exactly the same code. A service's ``migrations/env.py`` is one call to ``run_env``.
"""

from __future__ import annotations

import asyncio
import importlib
from pathlib import Path

from alembic import command, context
from alembic.config import Config
from sqlalchemy import MetaData, text
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

from libs.common.db import is_postgres, make_engine
from libs.common.settings import Settings


def alembic_config(service: str, url: str) -> Config:
    package = importlib.import_module(f"services.{service}")
    assert package.__file__ is not None
    config = Config()
    config.set_main_option("script_location", str(Path(package.__file__).parent / "migrations"))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.set_main_option("schema", service)
    return config


def upgrade(service: str, settings: Settings, revision: str = "head") -> None:
    """Bring one service's database to ``revision`` (blocking: async code uses upgrade_async)."""
    command.upgrade(alembic_config(service, settings.database_url_for(service)), revision)


async def upgrade_async(service: str, settings: Settings, revision: str = "head") -> None:
    await asyncio.to_thread(upgrade, service, settings, revision)


def run_env(metadata: MetaData) -> None:
    """The body of every service's ``migrations/env.py``."""
    config = context.config
    url = config.get_main_option("sqlalchemy.url")
    schema = config.get_main_option("schema")
    assert url and schema
    if context.is_offline_mode():
        context.configure(url=url, target_metadata=metadata, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    asyncio.run(_run_online(url, schema, metadata))


async def _run_online(url: str, schema: str, metadata: MetaData) -> None:
    engine = make_engine(url, schema, poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            if is_postgres(url):
                await connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
                await connection.commit()
            await connection.run_sync(_run_sync, metadata)
    finally:
        await engine.dispose()


def _run_sync(connection: Connection, metadata: MetaData) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        compare_type=True,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()
