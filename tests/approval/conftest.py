"""Fixtures of the approval tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from libs.common.db import make_engine
from libs.common.settings import Settings


@pytest.fixture
async def approval_db(settings: Settings) -> AsyncIterator[AsyncEngine]:
    """approval's own database, to tamper with the audit chain as an attacker would."""
    engine = make_engine(settings.database_url_for("approval"), "approval")
    yield engine
    await engine.dispose()
