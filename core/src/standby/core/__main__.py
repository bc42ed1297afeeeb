"""`python -m standby.core` runs the CLI."""

from __future__ import annotations

from standby.core.entry import main

main()
