"""The shared auth schema, applied by every service at start:
`await migrate(conn, "auth", AUTH_MIGRATIONS)` (services.common.db; advisory-locked)."""

from __future__ import annotations

from pathlib import Path

AUTH_MIGRATIONS = Path(__file__).parent
