"""Structured logs: JSON lines (default in containers) or plain text."""

from __future__ import annotations

import collections
import logging
import sys
import time
from typing import Any

import orjson

__all__ = ["TextFormatter", "Throttled", "setup_logging"]

_STD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class Throttled:
    """Log the first occurrence of a condition at once, then a count at most every ``period`` seconds."""

    def __init__(self, log: logging.Logger, period: float = 10.0) -> None:
        self.log = log
        self.period = period
        self.last: dict[str, float] = {}
        self.suppressed: collections.Counter[str] = collections.Counter()

    def warning(self, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self.last.get(key, -1e9) >= self.period:
            extra = f" (+{self.suppressed[key]} similar since last report)" if self.suppressed[key] else ""
            self.log.warning(msg + extra, *args)
            self.last[key] = now
            self.suppressed[key] = 0
        else:
            self.suppressed[key] += 1

    def report(self, *, now: bool = False) -> None:
        """Say how many were not logged once their period is over (the condition may have stopped,
        so no next warning would say it), or at once (``now``: a stop)."""
        at = time.monotonic()
        for key, n in self.suppressed.items():
            if n and (now or at - self.last.get(key, -1e9) >= self.period):
                self.log.warning(
                    "%d more %r conditions since the last report (exact counts: metrics)", n, key
                )
                self.suppressed[key] = 0
                self.last[key] = at


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STD and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        try:
            return orjson.dumps(doc, default=str).decode()
        except TypeError:
            # A lone surrogate (a path or a name that was not UTF-8, decoded with surrogateescape):
            # orjson refuses it, and the whole line was lost. The text form keeps it, escaped.
            return orjson.dumps(_escaped(doc), default=str).decode()


def _escaped(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_escaped(k): _escaped(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_escaped(v) for v in value]
    return str(value) if not isinstance(value, int | float | bool | type(None)) else value


def _controls() -> dict[int, str]:
    return {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0)) if c not in (0x09, 0x0A)}


_CONTROLS = _controls()
"""What a text log line writes escaped (``\\xNN``): every C0 control but tab and LF (a traceback's lines,
a message's own), DEL and the C1 controls. A receiver's answer quoting an Event's field (a webhook's
422 "field reason invalid: ...") reaches a reason the router logs: its ESC sequences cleared the screen
of ``kubectl logs -f``, hid the rest of the line or set the window title. (JSON lines are escaped by
their encoder.)"""


class TextFormatter(logging.Formatter):
    """``time level logger: message``, terminal controls shown, never run (``_CONTROLS``)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).translate(_CONTROLS)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Client libraries are chatty at info; their warnings still show.
    for noisy in ("aiokafka", "kafka", "elastic_transport", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
