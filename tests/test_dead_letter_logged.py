"""Without --data-dir there is no dead-letter file: the log is the only record of which occurrences
were dead-lettered, and docs/writing-a-sink.md promises they are "logged and counted". Before, the log
named 3 rejected occurrences of a batch ("rejected 7 more") and none given up after
``retry_max_attempts``, so which to send again was known nowhere. A whole Router against the project's
Kubernetes API test server."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from eventrouter.app import Router
from eventrouter.config import spec_for_class
from eventrouter.sink import reject, retry
from eventrouter.testing import MemorySink, event_object
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.routers import router_settings
from eventrouter.testing.waiting import until

QUICK = {"batch_max_wait": 0.05, "retry_initial_backoff": 0.01, "retry_max_backoff": 0.02}
REASONS = {
    "rejected": "400 mapping error",
    "in-place": "retries exhausted after 2 attempts: 503 busy",
    "set-aside": "retries exhausted after 2 attempts: index closed",
}


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(token="t") as server:
        yield server


def _dead(router: Router, sink: str) -> float:
    return sum(
        router.metrics.registry.get_sample_value(
            "eventrouter_sink_dead_lettered_total", {"sink": sink, "reason": reason}
        )
        or 0.0
        for reason in ("rejected", "retries_exhausted")
    )


async def test_without_a_data_dir_every_dead_letter_is_named_in_the_log_with_its_reason(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    specs = [
        spec_for_class(MemorySink, {"name": name, **QUICK, "retry_max_attempts": 2}, type_="memory")
        for name in REASONS
    ]
    router = Router(router_settings(api, tmp_path), specs)
    async with router.running():
        await until(lambda: router.ready()[0])
        router.sinks["rejected"].decide = lambda occ: reject("400 mapping error")
        router.sinks["in-place"].decide = lambda occ: retry("503 busy")
        router.sinks["set-aside"].decide = lambda occ: retry("index closed", defer=True)
        keys = [
            f"{api.create_event(event_object(object_name=f'o-{i}'))['metadata']['uid']}/1" for i in range(12)
        ]
        await until(lambda: all(_dead(router, name) == 12 for name in REASONS), timeout=20)
    for name, reason in REASONS.items():
        lines = [
            r.getMessage()
            for r in caplog.records
            if r.getMessage().startswith(f"sink {name}: ") and "not kept (no --data-dir" in r.getMessage()
        ]
        named = re.findall(r"[0-9a-f-]{36}/1", " ".join(lines))
        assert sorted(named) == sorted(keys), (name, lines)  # each once
        assert all(line.endswith(f"({reason})") for line in lines), lines
