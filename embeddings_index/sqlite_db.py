"""The one SQLite connection set-up shared by every embedded store.

Exemplars, admin state, critic records and the decision log each keep their own
file, opened the same way: autocommit (transactions are explicit), usable from
the worker threads behind the caller's own lock, write-ahead logging so readers
never wait for the writer, and the schema created if missing.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

__all__ = ["open_sqlite"]


def open_sqlite(
    path: Path | str, schema: str, *, durable: bool = True, timeout_s: float = 5.0
) -> sqlite3.Connection:
    """Open (creating if needed) the database at `path` and apply `schema`.

    Args:
        durable: `synchronous=FULL`, so an acknowledged write survives a power
            cut; False (`NORMAL`) for logs that may lose their last writes.
        timeout_s: How long a statement waits for another process's lock.

    Raises:
        sqlite3.Error: the file cannot be opened or the schema applied.
    """
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=timeout_s)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        conn.executescript(schema)
    except sqlite3.Error:
        conn.close()
        raise
    return conn
