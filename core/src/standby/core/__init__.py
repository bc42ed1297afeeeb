"""standby core: contracts, replication engine, state and CLI."""

from __future__ import annotations

__version__ = "0.1.0"
