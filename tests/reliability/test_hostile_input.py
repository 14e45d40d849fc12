"""Malformed and hostile input: the router keeps running and accounts for every object (delivered,
rejected with a reason into the dead-letter file, or counted as malformed in /metrics)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from reliability_harness import check
from reliability_scenarios import (
    HostileApiServer,
    cardinality,
    hostile_api_objects,
    hostile_stream,
    memory_spec,
    settings_for,
)

from eventrouter.app import Router
from eventrouter.testing.waiting import until


async def test_odd_objects_are_delivered_or_dead_lettered_by_every_sink(tmp_path: Path) -> None:
    report = await hostile_api_objects(tmp_path)
    check(report)
    assert report.facts["malformed"] == 0  # each has a uid: none may be dropped at the source
    # Loki takes the five outside its time window, stamped at receipt: no push refused for them.
    assert report.facts["loki_time_adjusted"] == 5
    assert report.facts["loki_pushes_refused"] == report.facts["dead_lettered_loki"] == 0


async def test_junk_lines_are_counted_broken_unicode_repaired_and_the_watch_goes_on(tmp_path: Path) -> None:
    report = await hostile_stream(tmp_path)
    check(report)
    f = report.facts
    for reason in ("malformed_line", "malformed", "unknown_watch_type"):
        assert f[f"dropped_{reason}"] == f[f"expected_dropped_{reason}"], reason
    # Invalid UTF-8 and lone surrogates, in the list page and in watch lines: delivered with U+FFFD.
    assert f["repaired"] == f["expected_repaired"] == 8
    assert f["repaired_messages_wrong"] == {}
    assert f["watches_opened"] == 1 and f["running"]


async def test_20k_distinct_involved_objects_all_delivered_with_bounded_loki_streams(tmp_path: Path) -> None:
    report = await cardinality(tmp_path, objects=20_000)
    check(report)
    assert report.facts["tracked_events"] == 20_000
    assert report.facts["loki_streams"] <= 200


async def test_webhook_sends_a_body_over_1_mib_without_warning(tmp_path: Path) -> None:
    from reliability_harness import Ledger, webhook_keys
    from reliability_scenarios import api_server, settings_for

    from eventrouter.app import Router
    from eventrouter.config import build_specs
    from eventrouter.testing import event_object
    from eventrouter.testing.receivers.webhook import WebhookReceiver
    from eventrouter.testing.waiting import until

    async with api_server() as api, WebhookReceiver() as hook:
        router = Router(
            settings_for(api, tmp_path, shutdown_timeout=0.5),
            build_specs([f"webhook:{hook.url}?batch_max_wait=0.01"]),
        )
        ledger = Ledger(api)
        async with router.running():
            await until(lambda: router.ready()[0])
            ledger.create(event_object(object_name="big", message="M" * (1024 * 1024 + 10)))
            await until(lambda: ledger.complete(webhook_keys(hook)), timeout=5)


async def test_hostile_objects_already_held_by_the_api_server_are_listed_and_delivered(
    tmp_path: Path,
) -> None:
    """The same objects, there before the router starts: they come by the first list, which a Loki
    sink has handed on oldest first (the sort once crashed the watch, and with it the router, on a
    year-9999 eventTime). The router becomes ready and every sink accounts for every occurrence."""
    from reliability_harness import Ledger, loki_keys
    from reliability_scenarios import api_server, deadletter_keys, memory_keys, memory_spec, settings_for

    from eventrouter.app import Router
    from eventrouter.config import build_specs
    from eventrouter.testing import event_object
    from eventrouter.testing.hostile import hostile_objects
    from eventrouter.testing.receivers.loki import LokiReceiver
    from eventrouter.testing.waiting import until

    data = tmp_path / "data"
    async with api_server() as api, LokiReceiver() as loki:
        ledger = Ledger(api)
        for obj in [*hostile_objects(), event_object(object_name="after-hostile")]:
            ledger.create(obj)
        router = Router(
            settings_for(api, tmp_path, data_dir=data),
            [memory_spec(), *build_specs([f"loki:{loki.url}?batch_max_wait=0.02"])],
        )
        async with router.running():
            await until(lambda: router.ready()[0], timeout=20)
            await until(lambda: ledger.complete(memory_keys(router)), timeout=20)
            await until(
                lambda: ledger.complete(
                    loki_keys(loki) + deadletter_keys(data / "deadletter" / "loki.jsonl")
                ),
                timeout=20,
            )
        assert router.metrics.source_dropped.labels("malformed")._value.get() == 0
        assert deadletter_keys(data / "deadletter" / "loki.jsonl") == []


@pytest.mark.parametrize("code", [[500], 2**62, "500", None])
async def test_a_watch_error_whose_code_is_no_status_code_is_a_500_and_the_router_goes_on(
    tmp_path: Path, code: object
) -> None:
    """A list for a code crashed the watch task (int() of it), which stopped the router; a huge
    number became a metric label value of its own."""
    line = orjson.dumps({"type": "ERROR", "object": {"kind": "Status", "code": code, "message": "x"}})
    async with HostileApiServer([line]) as server:
        router = Router(settings_for(server, tmp_path), [memory_spec()])
        restarts = router.metrics.watch_restarts
        async with router.running():
            await until(lambda: server.watches >= 2)  # reconnected after the error
            assert not router.stopped.is_set()
        labels = {
            s.labels["reason"]
            for m in restarts.collect()
            for s in m.samples
            if s.name.endswith("_total") and s.value
        }
        assert labels == {"http_500"}
