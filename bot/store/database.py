"""The async database: engine and sessions, SQLite tuned for a bot (WAL), migrations on start."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, ProgrammingError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

log = logging.getLogger(__name__)
# The repository's migrations/ folder, installed as the package bot.migrations (see pyproject.toml).
MIGRATIONS = "bot.migrations:"
# How long a statement waits for a lock another writer holds before it fails (and is retried by the
# caller): SQLite's busy_timeout, Postgres's lock_timeout.
LOCK_WAIT_MS = 5000
# Postgres advisory lock taken by `serialized` transactions (admission): any fixed 64-bit number.
SERIALIZED_LOCK_KEY = 0x466C7578626F74  # "Fluxbot"
_BEGIN_OPTION = "fluxbot_sqlite_begin"


class Database:
    """Owns the engine and the session factory; passed to every repository."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = make_url(url).get_backend_name() == "sqlite"
        _ensure_sqlite_folder(url)
        if self.is_sqlite:
            self.engine: AsyncEngine = create_async_engine(url)
            event.listen(self.engine.sync_engine, "connect", _sqlite_connect)
            event.listen(self.engine.sync_engine, "begin", _sqlite_begin)
        else:
            self.engine = create_async_engine(
                url,
                pool_pre_ping=True,
                connect_args={"server_settings": {"lock_timeout": str(LOCK_WAIT_MS)}},
            )
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    def session(self) -> AsyncSession:
        return self.sessions()

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncSession]:
        """A transaction that writes. On SQLite it takes the write lock at BEGIN (IMMEDIATE), waiting
        out other writers, instead of failing when a read inside it must turn into a write."""
        async with self.sessions() as session, session.begin():
            if self.is_sqlite:
                await session.connection(execution_options={_BEGIN_OPTION: "IMMEDIATE"})
            yield session

    @asynccontextmanager
    async def serialized(self) -> AsyncIterator[AsyncSession]:
        """A write transaction no other serialized one, in this process or another, interleaves with:
        checks made inside it hold until it commits (admission: count, then insert). SQLite's write
        lock already does that; Postgres takes one advisory lock for the transaction."""
        async with self.write() as session:
            if not self.is_sqlite:
                lock = text("SELECT pg_advisory_xact_lock(:key)")
                await session.execute(lock, {"key": SERIALIZED_LOCK_KEY})
            yield session

    async def upgrade(self, catalog: dict[str, Any] | None = None) -> None:
        """Apply alembic migrations up to head (alembic's env runs its own loop, so in a thread).
        `catalog`: the presets and whitelist in use, for migrations that convert stored jobs."""
        await asyncio.to_thread(upgrade_database, self.url, "head", catalog)

    async def close(self) -> None:
        await self.engine.dispose()


def is_store_fault(exc: BaseException) -> bool:
    """The database is locked, read-only, restarting or unreachable: try again later, nobody's fault.

    Errors in what was asked (a constraint, bad SQL or data) are not faults: retrying cannot help.
    """
    if isinstance(exc, IntegrityError | ProgrammingError | DataError):
        return False
    return isinstance(exc, DBAPIError | PoolTimeout | OSError | TimeoutError)


def _ensure_sqlite_folder(url: str) -> None:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets /history read while a job is recorded; busy_timeout rides out short write locks.
    cursor = dbapi_connection.cursor()
    # First: setting the journal mode needs a lock another process (a second bot) may be holding.
    cursor.execute(f"PRAGMA busy_timeout={LOCK_WAIT_MS}")
    cursor.execute("PRAGMA journal_mode=WAL")
    # In WAL mode NORMAL syncs at checkpoints, not on every commit: a commit is still durable when the
    # process is killed (kill -9 loses nothing), only a power cut can lose the last commits.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
    # SQLAlchemy emits BEGIN itself (below), so a transaction can ask for BEGIN IMMEDIATE.
    dbapi_connection.isolation_level = None


def _sqlite_begin(connection: Any) -> None:
    mode = connection.get_execution_options().get(_BEGIN_OPTION, "DEFERRED")
    connection.exec_driver_sql(f"BEGIN {mode}")


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", MIGRATIONS)
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade_database(url: str, revision: str = "head", catalog: dict[str, Any] | None = None) -> None:
    from alembic import command

    _ensure_sqlite_folder(url)
    log.info("migrating the database to %s", revision)
    config = alembic_config(url)
    if catalog is not None:
        config.attributes["fluxbot_catalog"] = catalog
    command.upgrade(config, revision)
