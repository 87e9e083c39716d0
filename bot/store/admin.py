"""Users (bans, limits), admin-changed settings and the audit log."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select

from bot.store.database import Database
from bot.store.models import AuditEntry, Setting, User


class AdminStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def set_ban(
        self, user_id: int, banned: bool, reason: str | None, actor_id: int, guild_id: int | None
    ) -> None:
        async with self.db.write() as session:
            user = await session.get(User, user_id)
            if user is None:
                user = User(id=user_id, name="")
                session.add(user)
            user.banned, user.ban_reason = banned, reason
            session.add(
                _audit(
                    actor_id, guild_id, "ban" if banned else "unban", {"user_id": user_id, "reason": reason}
                )
            )

    async def setting(self, key: str) -> dict[str, Any] | None:
        async with self.db.session() as session:
            row = await session.get(Setting, key)
            return dict(row.value) if row else None

    async def settings_with_prefix(self, prefix: str) -> dict[str, dict[str, Any]]:
        async with self.db.session() as session:
            result = await session.execute(select(Setting).where(Setting.key.startswith(prefix)))
            return {row.key: dict(row.value) for row in result.scalars()}

    async def put_setting(
        self, key: str, value: dict[str, Any] | None, actor_id: int, guild_id: int | None, action: str
    ) -> None:
        """Change (or with None, delete) one setting and write the audit entry in the same transaction."""
        async with self.db.write() as session:
            row = await session.get(Setting, key)
            before = dict(row.value) if row else None
            if value is None:
                if row is not None:
                    await session.delete(row)
            elif row is None:
                session.add(Setting(key=key, value=value, updated_by=actor_id))
            else:
                row.value, row.updated_by = value, actor_id
            session.add(_audit(actor_id, guild_id, action, {"key": key, "before": before, "after": value}))

    async def audit(self, limit: int = 20) -> Sequence[AuditEntry]:
        async with self.db.session() as session:
            result = await session.execute(select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit))
            return result.scalars().all()

    async def record(self, actor_id: int, guild_id: int | None, action: str, detail: dict[str, Any]) -> None:
        async with self.db.write() as session:
            session.add(_audit(actor_id, guild_id, action, detail))


def _audit(actor_id: int, guild_id: int | None, action: str, detail: dict[str, Any]) -> AuditEntry:
    return AuditEntry(actor_id=actor_id, guild_id=guild_id, action=action, detail=detail)
