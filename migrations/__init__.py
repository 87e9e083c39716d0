"""Alembic migrations, installed as the package `bot.migrations` (alembic's script_location)."""
