"""Storage: SQLAlchemy models, the async database, and the repositories over them."""
