"""Real Redis and PostgreSQL for the tests, over real connections on 127.0.0.1.

`.ci/run` starts both when they are down and sets FLUXTEST_REQUIRE_SERVICES=1, so there a missing
service fails the run; on a laptop without them the tests that need them are skipped with the reason.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

REDIS_URL = os.environ.get("FLUXTEST_REDIS_URL", "redis://127.0.0.1:6379/13")
POSTGRES_URL = os.environ.get("FLUXTEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
DATABASE_BACKEND = "FLUXTEST_DATABASE"  # "sqlite" (default) or "postgres": what make_settings gives
TEST_DB_PREFIX = "fluxtest_"

T = TypeVar("T")


def run_sync(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion from sync code, even inside a running event loop (own thread)."""
    out: list[Any] = []

    def target() -> None:
        try:
            out.append(("ok", asyncio.run(_call(make))))
        except BaseException as exc:
            out.append(("err", exc))

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    kind, value = out[0]
    if kind == "err":
        raise value
    return value  # type: ignore[no-any-return]


async def _call(make: Callable[[], Awaitable[T]]) -> T:
    return await make()


def _unavailable(what: str, exc: BaseException) -> None:
    message = f"{what} is not reachable ({exc}); start it (see README, 'Tests') or set FLUXTEST_* URLs"
    if os.environ.get("FLUXTEST_REQUIRE_SERVICES") == "1":
        pytest.fail(message)
    pytest.skip(message)


def require_redis() -> str:
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        _unavailable("Redis", exc)
    finally:
        client.close()
    return REDIS_URL


def flush_redis() -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.flushdb()
    finally:
        client.close()


async def _admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(POSTGRES_URL, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def require_postgres() -> None:
    try:
        run_sync(lambda: _admin("SELECT 1"))
    except ImportError:
        raise  # asyncpg is a test dependency (.[postgres]): missing is a broken setup, not a skip
    except Exception as exc:  # refused, timed out, or asyncpg's own errors (auth, missing database)
        _unavailable("PostgreSQL", exc)


# The databases this test session made: only these are dropped at its end, so two sessions on one
# server (a developer's run beside .ci/run) never drop each other's databases mid-test.
_created_here: list[str] = []


def create_postgres_database() -> str:
    """A new, empty database for one test; dropped with the others at the end of the session."""
    name = TEST_DB_PREFIX + uuid.uuid4().hex[:16]
    run_sync(lambda: _admin(f'CREATE DATABASE "{name}"'))
    _created_here.append(name)
    base = POSTGRES_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    return f"{base}/{name}"


def drop_test_databases() -> None:
    async def drop_all() -> None:
        import asyncpg

        conn = await asyncpg.connect(POSTGRES_URL, timeout=5)
        try:
            for name in _created_here:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    run_sync(drop_all)


def database_url_for_test(tmp: Path) -> str:
    """SQLite in the test's folder, or a fresh Postgres database when the test runs on Postgres."""
    if os.environ.get(DATABASE_BACKEND) == "postgres":
        return create_postgres_database()
    return f"sqlite+aiosqlite:///{tmp / 'fluxbot.db'}"
