"""What the tests of answer bodies share (tests/test_body_prefix_s36.py, tests/test_body_prefix_s36b.py,
tests/sinks/test_bodies_s35.py): the Loki sink on the project's test Loki, occurrences it takes, and
the credential a front echoes in its answer."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

from eventrouter import Occurrence, SinkContext
from eventrouter.testing import make_occurrence
from eventrouter_sinks.loki import LokiOptions, LokiSink

LOG = logging.getLogger("test.body_prefix")
TOKEN = "s3cr3t-T0ken+abc/def0123456789"
ECHO_BYTES = b"refused POST /loki/api/v1/push with headers Authorization: Bearer " + TOKEN.encode() + b"\n"
"""A front's answer echoing the push's headers, as it sends them: bytes, read under the charset it
labels them with."""
ECHO_TEXT = "refused POST /loki/api/v1/push with Authorization: Bearer " + TOKEN + "\n"
"""An echo of the push's Authorization header as text, for a front to encode (UTF-16, UTF-32)."""


def recent(n: int) -> list[Occurrence]:
    """``n`` occurrences of one stream, half a minute old (within any Loki's limits)."""
    when = datetime.fromtimestamp(time.time() - 30, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return [make_occurrence(cluster="c1", object_name=f"pod-{i}", first_timestamp=when) for i in range(n)]


@asynccontextmanager
async def loki_sink(url: str, **options: object) -> AsyncIterator[LokiSink]:
    """A Loki sink pushing to ``url`` (a 3 s timeout and ``options``), started; closed after."""
    sink = LokiSink(
        LokiOptions.model_validate({"url": url, "timeout": 3, **options}),
        SinkContext("loki", "c1", None, LOG, 30.0),
    )
    await sink.start()
    try:
        yield sink
    finally:
        await sink.aclose()
