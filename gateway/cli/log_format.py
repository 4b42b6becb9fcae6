"""Log lines as JSON, one object a line, for log pipelines (`--log-format json`).

Each line carries the time, level, logger, message and, inside a call, its
request id. The gateway's own log messages never hold a token or a prompt;
this formatter adds nothing but those fields (and, in a worker of `serve
--workers`, the worker's number, so that interleaved lines can be told apart).
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from gateway.api.interceptors import REQUEST_ID

__all__ = ["JsonFormatter", "configure_logging"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def __init__(self, *, worker: int | None = None) -> None:
        super().__init__()
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, str | int] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self._worker is not None:
            line["worker"] = self._worker
        request_id = REQUEST_ID.get()
        if request_id:
            line["request_id"] = request_id
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure_logging(level: str, log_format: str, *, worker: int | None = None) -> None:
    """The root logger at `level` ("info", ...), as text or JSON lines on stderr.

    `worker`: this process is that worker of `serve --workers` (named in each line).
    """
    handler = logging.StreamHandler()
    text = (
        TEXT_FORMAT
        if worker is None
        else TEXT_FORMAT.replace(" %(name)s", f" [worker {worker}] %(name)s")
    )
    handler.setFormatter(
        JsonFormatter(worker=worker) if log_format == "json" else logging.Formatter(text)
    )
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)
