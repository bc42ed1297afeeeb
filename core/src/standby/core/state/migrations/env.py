"""Alembic environment: runs on the connection handed over by `standby.core.state.db.migrate`."""

from __future__ import annotations

from alembic import context

from standby.core.state.db import Base

connection = context.config.attributes.get("connection")
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=True,
)
with context.begin_transaction():
    context.run_migrations()
