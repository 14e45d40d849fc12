"""Without --data-dir there is no dead-letter file (and a full volume has one that cannot be
written): the log is the only record of which occurrences were dead-lettered, and
docs/writing-a-sink.md promises they are "logged and counted". Before, the log
named 3 rejected occurrences of a batch ("rejected 7 more") and none given up after
``retry_max_attempts``, so which to send again was known nowhere. A whole Router against the project's
Kubernetes API test server."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

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


class _Refusing(MemorySink):
    """Refuses everything from its first send (the events are there before the router starts)."""

    def __init__(self, options: Any, context: object) -> None:
        super().__init__(options, context)
        self.decide = lambda occ: reject("400 mapping error")


async def test_a_dead_letter_file_that_cannot_be_written_names_every_dead_letter_in_the_log(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A full volume (here: the file's folder is gone) makes the log the dead letters' only record,
    as without --data-dir. It named 20 of a batch and "N more": a refused batch of hundreds was then
    counted, and known nowhere."""
    caplog.set_level(logging.INFO)
    data = tmp_path / "data"
    (data / "deadletter").mkdir(parents=True)
    (data / "deadletter" / "refusing.jsonl").symlink_to(tmp_path / "gone" / "refusing.jsonl")  # ENOENT
    keys = [f"{api.create_event(event_object(object_name=f'o-{i}'))['metadata']['uid']}/1" for i in range(45)]
    spec = spec_for_class(_Refusing, {"name": "refusing", **QUICK}, type_="memory")
    router = Router(router_settings(api, tmp_path, data_dir=data), [spec])
    async with router.running():
        await until(lambda: _dead(router, "refusing") == 45, timeout=20)
        batches = router.sinks["refusing"].batches
    assert max(batches) > 20, batches  # a batch larger than what was named before
    errors = router.metrics.registry.get_sample_value(
        "eventrouter_data_dir_errors_total", {"sink": "refusing", "file": "deadletter"}
    )
    assert errors == len(batches)
    lines = [
        r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith("sink refusing: dead-letter file ")
        and "cannot be written" in r.getMessage()
    ]
    named = re.findall(r"[0-9a-f-]{36}/1", " ".join(lines))
    assert sorted(named) == sorted(keys), lines  # each once
    assert all(line.endswith("(400 mapping error)") for line in lines), lines
    assert "only record" in lines[0] and "no --data-dir" not in lines[0]
