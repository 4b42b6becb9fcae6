"""One database layer under every store: SQLite files by default, or one PostgreSQL database.

The exemplar store, the admin state, the decision log and the critic records
each write their SQL once, in what both engines understand: `?` placeholders,
`INSERT ... ON CONFLICT`, and two schema tokens, `{id}` (an auto-numbered
primary key) and `{blob}` (bytes). A `Database` runs it:

* `SQLiteDatabase`: one file (`<data_dir>/<name>.sqlite3`) and one connection
  behind a lock, write-ahead logging; `synchronous=FULL` when durable, so a
  write that returned survives a power cut (`NORMAL` for logs that may lose
  their last writes).
* `PostgresDatabase`: connections from one pool that every store of a
  `Storage` shares; `synchronous_commit` on when durable, so a commit that
  returned is on the server's disk (off, per transaction, for logs).

Schemas are versioned. Each store lists its migrations; `migrate` applies the
missing ones at start, in one transaction, and records each in
`schema_version`. On PostgreSQL that transaction first takes
`pg_advisory_xact_lock(SCHEMA_LOCK)`, so replicas that start together apply
each migration once; on SQLite `BEGIN IMMEDIATE` serialises them.

Driver errors become `DatabaseError`, whose message names the database (a
URL never with its password) and what went wrong.
"""

from __future__ import annotations

import abc
import functools
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # psycopg is imported only when a PostgreSQL URL is used
    import psycopg
    from psycopg_pool import ConnectionPool

__all__ = [
    "POSTGRES_SCHEMES",
    "SCHEMA_LOCK",
    "Database",
    "DatabaseError",
    "Listener",
    "PostgresDatabase",
    "Row",
    "SQLiteDatabase",
    "Storage",
    "Transaction",
    "as_database",
    "describe_url",
    "is_postgres_url",
    "open_migrated",
    "scratch_schema",
    "url_in_schema",
]

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
# pg_advisory_xact_lock key held while a schema is migrated: b"tierguar" as a bigint.
SCHEMA_LOCK = 0x7469_6572_6775_6172

Row = tuple[Any, ...]
Params = Sequence[object]

_SCHEMA_VERSION = """
CREATE TABLE IF NOT EXISTS schema_version (
    component TEXT NOT NULL,
    version INTEGER NOT NULL,
    applied_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (component, version)
)
"""


class DatabaseError(RuntimeError):
    """The database could not be reached, read or written; the message names it."""


def is_postgres_url(url: str) -> bool:
    """Whether `url` names a PostgreSQL database (postgresql:// or postgres://)."""
    return url.startswith(POSTGRES_SCHEMES)


def describe_url(url: str) -> str:
    """`url` fit for messages and logs: scheme, user, host and database; no password, no query."""
    scheme, _, rest = url.partition("://")
    netloc, _, path = rest.partition("/")
    userinfo, _, hosts = netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    database = path.split("?", 1)[0]
    return f"{scheme}://{user + '@' if user else ''}{hosts.split('?', 1)[0]}/{database}"


class Transaction(abc.ABC):
    """Statements that commit together, or not at all."""

    @abc.abstractmethod
    def execute(self, sql: str, params: Params = ()) -> int:
        """Run one statement; returns the number of rows it changed."""

    @abc.abstractmethod
    def executemany(self, sql: str, rows: Iterable[Params]) -> None:
        """Run one statement once per parameter row."""

    @abc.abstractmethod
    def query(self, sql: str, params: Params = ()) -> list[Row]:
        """Run one statement and return its rows."""

    def query_one(self, sql: str, params: Params = ()) -> Row | None:
        """The first row of a query, or None."""
        rows = self.query(sql, params)
        return rows[0] if rows else None

    @abc.abstractmethod
    def notify(self, channel: str, payload: str) -> None:
        """Tell listeners on `channel` at commit (PostgreSQL NOTIFY); nothing on SQLite."""

    @abc.abstractmethod
    def lock(self, key: str) -> None:
        """Hold the lock named `key` until the transaction ends; other holders wait.

        On PostgreSQL a transaction-scoped advisory lock (every process on the
        database sees it); on SQLite nothing more is needed: `BEGIN IMMEDIATE`
        already serialises every writing transaction on the file.
        """


class Database(abc.ABC):
    """Where one store keeps its tables; safe to share between threads.

    Attributes:
        name: The database in messages: a file, or a URL without its password.
        path: The SQLite file, or None on PostgreSQL.
    """

    name: str
    path: Path | None = None
    _tokens: ClassVar[Mapping[str, str]]

    @abc.abstractmethod
    def transaction(
        self, *, schema_lock: bool = False, snapshot: bool = False
    ) -> AbstractContextManager[Transaction]:
        """A transaction, committed when the block ends, rolled back if it raises.

        Args:
            schema_lock: Hold the schema lock (other processes' migrations wait).
            snapshot: Read only, and every statement sees the same committed
                state (PostgreSQL `REPEATABLE READ`; on SQLite a deferred
                transaction, whose reads share one snapshot of the file).

        Raises:
            DatabaseError: the database failed; nothing was committed.
        """

    @abc.abstractmethod
    def query(self, sql: str, params: Params = ()) -> list[Row]:
        """Run one read statement on its own; returns its rows."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the connection (or this store's share of the pool)."""

    def execute(self, sql: str, params: Params = ()) -> int:
        """Run one statement in a transaction of its own; returns the rows it changed."""
        with self.transaction() as tx:
            return tx.execute(sql, params)

    def schema(self, script: str) -> str:
        """`script` with its `{id}` and `{blob}` tokens in this engine's words."""
        return script.format(**self._tokens)

    def migrate(self, component: str, migrations: Sequence[str]) -> int:
        """Bring `component`'s tables to the last of `migrations`; returns its schema version.

        Migration n (from 1) is applied once, in the same transaction as the
        `schema_version` row that records it.

        Raises:
            DatabaseError: a migration failed (nothing of it stays), or the
                database is at a version newer than this code knows.
        """
        with self.transaction(schema_lock=True) as tx:
            tx.execute(_SCHEMA_VERSION)
            row = tx.query_one(
                "SELECT MAX(version) FROM schema_version WHERE component = ?", (component,)
            )
            done = int(row[0]) if row and row[0] is not None else 0
            if done > len(migrations):
                raise DatabaseError(
                    f"{self.name}: the {component} tables are at schema version {done}, newer "
                    f"than this tierguard knows ({len(migrations)}); upgrade tierguard"
                )
            for version in range(done + 1, len(migrations) + 1):
                for statement in _statements(self.schema(migrations[version - 1])):
                    tx.execute(statement)
                tx.execute(
                    "INSERT INTO schema_version (component, version, applied_at) VALUES (?, ?, ?)",
                    (component, version, time.time()),
                )
        return len(migrations)


def as_database(
    location: Database | Path | str, *, durable: bool = True, timeout_s: float = 5.0
) -> Database:
    """`location` if it is a Database, else the SQLite file at that path (see `SQLiteDatabase`)."""
    if isinstance(location, Database):
        return location
    return SQLiteDatabase(location, durable=durable, timeout_s=timeout_s)


def url_in_schema(url: str, schema: str) -> str:
    """`url` with every connection's search_path set to `schema`."""
    return f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"


@contextmanager
def scratch_schema(url: str, prefix: str = "tierguard_scratch") -> Iterator[str]:
    """A new, empty schema of the PostgreSQL database at `url`, as a URL whose
    connections use it; dropped with everything in it on exit. For tests and
    benchmarks that need a cold store without a database of their own."""
    import psycopg
    from psycopg import sql

    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    try:
        yield url_in_schema(url, schema)
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


def open_migrated(
    location: Database | Path | str,
    component: str,
    migrations: Sequence[str],
    *,
    durable: bool = True,
    timeout_s: float = 5.0,
) -> Database:
    """`as_database(location)` with `component`'s migrations applied; closed again if
    they fail, so a store that cannot start leaves no connection behind.

    Raises:
        DatabaseError: the database cannot be opened or migrated.
    """
    database = as_database(location, durable=durable, timeout_s=timeout_s)
    try:
        database.migrate(component, migrations)
    except BaseException:
        database.close()
        raise
    return database


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# -- SQLite -------------------------------------------------------------------------


def _switch_to_wal(conn: sqlite3.Connection, timeout_s: float) -> None:
    """`PRAGMA journal_mode=WAL`, retried while another connection holds the file.

    Processes or threads opening a new file together race to switch its journal
    mode; SQLite answers "database is locked" at once, without its busy timeout,
    to one that would otherwise risk a deadlock. The loser tries again (the
    switch is done once per file; later opens find WAL and return at once).
    """
    deadline = time.monotonic() + timeout_s
    pause = 0.005
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


class _SQLiteTransaction(Transaction):
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Params = ()) -> int:
        return self._conn.execute(sql, params).rowcount

    def executemany(self, sql: str, rows: Iterable[Params]) -> None:
        self._conn.executemany(sql, rows)

    def query(self, sql: str, params: Params = ()) -> list[Row]:
        return self._conn.execute(sql, params).fetchall()

    def notify(self, channel: str, payload: str) -> None:
        pass  # one process per file: nobody to tell

    def lock(self, key: str) -> None:
        pass  # BEGIN IMMEDIATE holds the file's write lock already


class SQLiteDatabase(Database):
    """One SQLite file: one connection, used under a lock, write-ahead logging."""

    _tokens: ClassVar[Mapping[str, str]] = {
        "id": "INTEGER PRIMARY KEY AUTOINCREMENT",
        "blob": "BLOB",
    }

    def __init__(self, path: Path | str, *, durable: bool = True, timeout_s: float = 5.0) -> None:
        """Open (creating if needed) the file at `path`.

        Args:
            durable: `synchronous=FULL`, so an acknowledged write survives a
                power cut; False (`NORMAL`) for logs that may lose their last writes.
            timeout_s: How long a statement waits for another process's lock.

        Raises:
            DatabaseError: the file cannot be created or opened.
        """
        self.path = Path(path)
        self.name = str(self.path)
        self._lock = threading.RLock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, timeout=timeout_s
            )
        except (OSError, sqlite3.Error) as exc:
            raise DatabaseError(f"cannot open {self.path}: {_one_line(exc)}") from exc
        try:
            _switch_to_wal(self._conn, timeout_s)
            self._conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        except sqlite3.Error as exc:
            self._conn.close()
            raise DatabaseError(f"cannot open {self.path}: {_one_line(exc)}") from exc

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise DatabaseError(f"{self.name}: {_one_line(exc)}") from exc

    @contextmanager
    def transaction(
        self, *, schema_lock: bool = False, snapshot: bool = False
    ) -> Iterator[Transaction]:
        # BEGIN IMMEDIATE takes the write lock up front: the whole file is the schema lock.
        # A reader's deferred BEGIN keeps the snapshot of its first read until it ends.
        with self._lock, self._errors():
            self._conn.execute("BEGIN" if snapshot else "BEGIN IMMEDIATE")
            try:
                yield _SQLiteTransaction(self._conn)
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

    def query(self, sql: str, params: Params = ()) -> list[Row]:
        with self._lock, self._errors():
            return self._conn.execute(sql, params).fetchall()

    def close(self) -> None:
        with self._lock:
            self._conn.close()


# -- PostgreSQL ---------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def _pg_sql(sql: str) -> str:
    """`?` placeholders as psycopg's `%s` (and a literal `%` doubled)."""
    return sql.replace("%", "%%").replace("?", "%s")


class _PostgresTransaction(Transaction):
    def __init__(self, conn: psycopg.Connection[Row]) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Params = ()) -> int:
        if not params:
            return self._conn.execute(sql).rowcount
        return self._conn.execute(_pg_sql(sql), params).rowcount

    def executemany(self, sql: str, rows: Iterable[Params]) -> None:
        with self._conn.cursor() as cursor:
            cursor.executemany(_pg_sql(sql), rows)

    def query(self, sql: str, params: Params = ()) -> list[Row]:
        if not params:
            return self._conn.execute(sql).fetchall()
        return self._conn.execute(_pg_sql(sql), params).fetchall()

    def notify(self, channel: str, payload: str) -> None:
        self._conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))

    def lock(self, key: str) -> None:
        self._conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (key,))


class PostgresDatabase(Database):
    """A store's handle on a shared PostgreSQL connection pool (see `Storage.open`)."""

    _tokens: ClassVar[Mapping[str, str]] = {
        "id": "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
        "blob": "BYTEA",
    }

    def __init__(
        self,
        pool: ConnectionPool[psycopg.Connection[Row]],
        *,
        name: str,
        durable: bool = True,
        release: Callable[[], None] | None = None,
    ) -> None:
        """A handle on `pool`; `release` is called once, on `close`."""
        self.name = name
        self._pool = pool
        self._durable = durable
        self._release = release
        self._closed = False

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Row]]:
        import psycopg

        try:
            with self._pool.connection() as conn:
                yield conn
        except psycopg.Error as exc:
            raise DatabaseError(f"{self.name}: {_one_line(exc)}") from exc

    @contextmanager
    def transaction(
        self, *, schema_lock: bool = False, snapshot: bool = False
    ) -> Iterator[Transaction]:
        with self._connection() as conn, conn.transaction():
            if snapshot:  # before any query: the snapshot is taken at the first one
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            if not self._durable:  # a log: its last lines may be lost in a crash
                conn.execute("SET LOCAL synchronous_commit TO off")
            if schema_lock:
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            yield _PostgresTransaction(conn)

    def query(self, sql: str, params: Params = ()) -> list[Row]:
        with self._connection() as conn:
            return _PostgresTransaction(conn).query(sql, params)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._release is not None:
                self._release()


# Longest a store call waits for a pooled connection (all busy, or the server away)
# before it fails with DatabaseError: callers get UNAVAILABLE, not a hung request.
_CONNECTION_WAIT_S = 5.0


def _open_pool(url: str, size: int) -> ConnectionPool[psycopg.Connection[Row]]:
    """A pool of autocommit connections to `url`, tried once first for a clear error.

    Raises:
        DatabaseError: the URL is malformed or the server refuses or is unreachable.
    """
    import psycopg
    from psycopg.conninfo import conninfo_to_dict
    from psycopg_pool import ConnectionPool

    name = describe_url(url)
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error as exc:
        raise DatabaseError(f"store URL {name}: {_one_line(exc)}") from exc
    kwargs: dict[str, Any] = {"autocommit": True}
    if "connect_timeout" not in params:
        kwargs["connect_timeout"] = 10
    if "application_name" not in params:
        kwargs["application_name"] = "tierguard"
    try:  # the pool would only log why it cannot connect; one try says it to the user
        psycopg.connect(url, **kwargs).close()
    except psycopg.Error as exc:
        raise DatabaseError(f"cannot connect to {name}: {_one_line(exc)}") from exc
    pool: ConnectionPool[psycopg.Connection[Row]] = ConnectionPool(
        url,
        kwargs=kwargs,
        min_size=1,
        max_size=max(1, size),
        open=False,
        configure=_configure,
        check=ConnectionPool.check_connection,  # a connection the server dropped is replaced
        name="tierguard",
        timeout=_CONNECTION_WAIT_S,
    )
    try:
        pool.open(wait=True, timeout=30.0)
    except psycopg.Error as exc:
        pool.close()
        raise DatabaseError(f"cannot connect to {name}: {_one_line(exc)}") from exc
    return pool


def _configure(conn: psycopg.Connection[Any]) -> None:
    # Acknowledged means on disk, whatever the server's default says.
    conn.execute("SET synchronous_commit TO on")


class Storage:
    """Where the stores live: SQLite files in a directory, or one PostgreSQL database.

    `open(name)` gives a store its database: `<data_dir>/<name>.sqlite3`, or a
    handle on one connection pool shared by every store opened here (closed
    when the last handle is, or by `close`).
    """

    def __init__(self, url: str | None, data_dir: Path, *, pool_size: int = 10) -> None:
        """
        Args:
            url: A postgresql:// URL, or None for SQLite files in `data_dir`.
            data_dir: The directory of the SQLite files.
            pool_size: Most PostgreSQL connections open at once.

        Raises:
            ValueError: `url` is not a PostgreSQL URL.
        """
        if url is not None and not is_postgres_url(url):
            raise ValueError("the store URL must start with postgresql:// (or postgres://)")
        self.url = url
        self.data_dir = Path(data_dir)
        self.pool_size = pool_size
        self._lock = threading.Lock()
        self._pool: ConnectionPool[psycopg.Connection[Row]] | None = None
        self._handles = 0

    @property
    def description(self) -> str:
        """Where the stores are, for logs: the URL without its password, or the directory."""
        return describe_url(self.url) if self.url else f"SQLite files in {self.data_dir}"

    def open(self, name: str, *, durable: bool = True, timeout_s: float = 5.0) -> Database:
        """The database of the store called `name` (exemplars, admin, critic, decisions).

        Args:
            durable: Every commit reaches the disk before it returns (False: logs).
            timeout_s: SQLite only: how long to wait for another process's lock.

        Raises:
            DatabaseError: the database cannot be opened or reached.
        """
        if self.url is None:
            return SQLiteDatabase(
                self.data_dir / f"{name}.sqlite3", durable=durable, timeout_s=timeout_s
            )
        with self._lock:
            if self._pool is None:
                self._pool = _open_pool(self.url, self.pool_size)
            self._handles += 1
            return PostgresDatabase(
                self._pool,
                name=describe_url(self.url),
                durable=durable,
                release=functools.partial(self._release, self._pool),
            )

    def _release(self, pool: ConnectionPool[psycopg.Connection[Row]]) -> None:
        with self._lock:
            if pool is not self._pool:
                return  # closed already by `close`
            self._handles -= 1
            if self._handles == 0:
                self._close_pool()

    def _close_pool(self) -> None:
        pool, self._pool, self._handles = self._pool, None, 0
        if pool is not None:
            pool.close()

    def close(self) -> None:
        """Close the PostgreSQL pool now, even if handles are still open (they stop working)."""
        with self._lock:
            self._close_pool()


class Listener:
    """A PostgreSQL connection of its own that receives notifications (`LISTEN`).

    Notifications are delivered only while the connection is up: a listener
    that lost its connection (`DatabaseError` from `wait` or `ping`) is closed
    and replaced, and whoever uses it reads what it missed from the tables.
    """

    def __init__(self, url: str, channels: Sequence[str], *, connect_timeout_s: int = 10) -> None:
        """Connect to `url` and listen on `channels`.

        Raises:
            DatabaseError: the server cannot be reached or refuses.
        """
        import psycopg
        from psycopg import sql
        from psycopg.conninfo import conninfo_to_dict

        self.name = describe_url(url)
        try:
            params = conninfo_to_dict(url)
            kwargs: dict[str, Any] = {"autocommit": True}
            if "connect_timeout" not in params:
                kwargs["connect_timeout"] = connect_timeout_s
            if "application_name" not in params:
                kwargs["application_name"] = "tierguard-listener"
            self._conn: psycopg.Connection[Row] = psycopg.connect(url, **kwargs)
        except psycopg.Error as exc:
            raise DatabaseError(f"cannot connect to {self.name}: {_one_line(exc)}") from exc
        try:
            for channel in channels:
                self._conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        except psycopg.Error as exc:
            self._conn.close()
            raise DatabaseError(f"{self.name}: cannot listen: {_one_line(exc)}") from exc

    def wait(self, timeout_s: float) -> list[tuple[str, str]]:
        """(channel, payload) of the notifications received, waiting at most `timeout_s`
        for the first; those that arrived with it or before come too; [] if none.

        Raises:
            DatabaseError: the connection is lost.
        """
        import psycopg

        try:
            first = list(self._conn.notifies(timeout=max(0.0, timeout_s), stop_after=1))
            more = list(self._conn.notifies(timeout=0.0)) if first else []
        except psycopg.Error as exc:
            raise DatabaseError(f"{self.name}: listening failed: {_one_line(exc)}") from exc
        return [(n.channel, n.payload) for n in first + more]

    @property
    def backend_pid(self) -> int:
        """The server process of this connection (`pg_stat_activity.pid`)."""
        return int(self._conn.info.backend_pid)

    def ping(self) -> None:
        """A round trip to the server: a connection that died silently fails here.

        Raises:
            DatabaseError: the connection is lost.
        """
        import psycopg

        try:
            self._conn.execute("SELECT 1")
        except psycopg.Error as exc:
            raise DatabaseError(f"{self.name}: listening failed: {_one_line(exc)}") from exc

    def close(self) -> None:
        """Close the connection (the server forgets the LISTENs)."""
        self._conn.close()
