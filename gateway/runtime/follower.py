"""Replicas follow the store: one gateway's index and policies track a shared PostgreSQL store.

Several gateways on one database each serve from their own FAISS index and
policy table. The store announces every change in the transaction that makes
it: `NOTIFY tierguard_index, '<version>'` for exemplars (add, remove,
rollback) and `NOTIFY tierguard_policy, '<name>'` for a policy changed through
the admin API. A `StoreFollower` keeps a connection of its own listening on
both, in a thread; on an index notification it applies the store's changes
since its index's version (`IndexManager.catch_up`: on the side of the current
index, a rebuild only for large change sets), on a policy notification it
re-reads the stored policies (`PolicyRegistry.reload_overrides`).

Notifications are lost while the listening connection is down, so after
every (re)connection it catches up on both before waiting, and every
`poll_s` seconds it checks anyway (and pings the connection, which finds one
that died silently). A failure is logged and counted, the connection is
replaced after a backoff (doubling up to `max_backoff_s`), and the gateway
goes on serving from what it has: following never stops the server.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from embeddings_index.database import DatabaseError, Listener
from embeddings_index.manager import CatchUp, IndexManager
from embeddings_index.store import INDEX_CHANNEL
from gateway.runtime.admin_state import POLICY_CHANNEL
from gateway.runtime.config import ConfigError
from gateway.runtime.metrics import Metrics
from gateway.runtime.policies import PolicyRegistry

__all__ = ["CHANNELS", "StoreFollower"]

log = logging.getLogger(__name__)

CHANNELS = (INDEX_CHANNEL, POLICY_CHANNEL)


class StoreFollower:
    """A thread that keeps one gateway's index and policies in step with the shared store."""

    def __init__(
        self,
        url: str,
        index: IndexManager,
        policies: PolicyRegistry,
        *,
        metrics: Metrics | None = None,
        poll_s: float = 5.0,
        min_backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        listen: Callable[[str, Sequence[str]], Listener] = Listener,
    ) -> None:
        """
        Args:
            url: The store's PostgreSQL URL (a connection of its own listens there).
            index: The gateway's index, brought up to the store's version.
            policies: The gateway's policies, reloaded when one changes.
            metrics: Where applies and errors are counted.
            poll_s: Seconds between checks made without a notification.
            min_backoff_s: First wait before reconnecting after a failure ...
            max_backoff_s: ... doubling up to this.
            listen: Opens the listening connection (tests substitute it).
        """
        if poll_s <= 0:
            raise ValueError("poll_s must be positive")
        self._url = url
        self._index = index
        self._policies = policies
        self._metrics = metrics
        self._poll_s = poll_s
        self._min_backoff_s = min_backoff_s
        self._max_backoff_s = max_backoff_s
        self._listen = listen
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._listener: Listener | None = None
        self.connected = threading.Event()  # set while a listening connection is up

    def start(self) -> None:
        """Start following, in a daemon thread."""
        if self._thread is not None:
            raise RuntimeError("the follower is already started")
        self._thread = threading.Thread(target=self._run, name="store-follower", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop following; waits up to `timeout_s` for the thread (it wakes at least every 0.5 s)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("the store follower did not stop within %.1f s", timeout_s)

    def sync(self, *, index: bool = True, policies: bool = True) -> CatchUp | None:
        """Catch up now (what the thread does on a notification); returns what the index applied.

        Raises:
            DatabaseError: the store cannot be read.
            ConfigError: a stored policy is invalid here.
        """
        applied = None
        if index:
            started = time.perf_counter()
            applied = self._index.catch_up()
            if applied is not None:
                self._count("rebuild" if applied.rebuilt else "incremental")
                log.info(
                    "index %d -> %d from the store: +%d -%d exemplars%s in %.1f ms",
                    applied.from_version,
                    applied.version,
                    applied.added,
                    applied.removed,
                    " (rebuilt)" if applied.rebuilt else "",
                    (time.perf_counter() - started) * 1000,
                )
        if policies:
            changed = self._policies.reload_overrides()
            if changed:
                self._count("policies")
                log.info("policies changed in the store: %s", ", ".join(changed[:20]))
        return applied

    # -- the thread ------------------------------------------------------------------

    def _run(self) -> None:
        backoff = self._min_backoff_s
        while not self._stop.is_set():
            try:
                self._listener = self._listen(self._url, CHANNELS)
            except Exception as exc:  # logged and retried, never fatal
                self._failed("cannot listen to the store", exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self._max_backoff_s)
                continue
            try:
                self.connected.set()
                self.sync()  # what was missed while nobody listened
                backoff = self._min_backoff_s
                self._follow(self._listener)
            except Exception as exc:  # logged, reconnected, never fatal
                self._failed("following the store failed", exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self._max_backoff_s)
            finally:
                self.connected.clear()
                try:
                    self._listener.close()
                except Exception:  # a dead connection may fail to close
                    log.debug("closing the store listener failed", exc_info=True)
                self._listener = None

    def _follow(self, listener: Listener) -> None:
        """Wait for notifications and apply them; return only by raising or on stop."""
        next_poll = time.monotonic() + self._poll_s
        while not self._stop.is_set():
            now = time.monotonic()
            notes = listener.wait(min(0.5, max(0.0, next_poll - now)))
            index_due = any(
                channel == INDEX_CHANNEL and _newer(payload, self._index.index.version)
                for channel, payload in notes
            )
            policies_due = any(channel == POLICY_CHANNEL for channel, _ in notes)
            if time.monotonic() >= next_poll:  # the safety net: a lost notification
                listener.ping()
                index_due = policies_due = True
                next_poll = time.monotonic() + self._poll_s
            if index_due or policies_due:
                self.sync(index=index_due, policies=policies_due)

    def _count(self, kind: str) -> None:
        if self._metrics is not None:
            self._metrics.follower_applies.labels(kind).inc()

    def _failed(self, what: str, exc: Exception) -> None:
        if self._metrics is not None:
            self._metrics.follower_errors.inc()
        log.error("%s (retrying): %s", what, exc, exc_info=not _expected(exc))


def _newer(payload: str, version: int) -> bool:
    """Whether a notification's version is past `version` (unreadable: assume so)."""
    try:
        return int(payload) > version
    except ValueError:
        return True


def _expected(exc: Exception) -> bool:
    """Errors of the database or of a stored policy (logged in one line), not bugs (logged
    with their traceback)."""
    return isinstance(exc, DatabaseError | ConfigError)
