"""A sorted relist holds back only what some sink would take: a sink that filters an occurrence out
never records it, so it must not make the occurrence "needed" (session 30 review, finding 3)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from eventrouter.app import Router
from eventrouter.config import spec_for_class
from eventrouter.record import Occurrence
from eventrouter.source.relist_order import RelistOrder
from eventrouter.testing import MemorySink, event_object
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.routers import router_settings
from eventrouter.testing.waiting import until


class _Ordered(MemorySink):
    wants_time_order = True  # as Loki: relists are sorted


async def _run(api: FakeApiServer, tmp_path: Path, want: dict[str, int]) -> Router:
    """A router on ``tmp_path``'s data dir with a time-ordered sink and a robot-like one that takes
    Warnings only, until both have ``want`` (received since this start) and are idle."""
    specs = [
        spec_for_class(_Ordered, {"name": "ordered", "batch_max_wait": 0.01}, type_="memory"),
        spec_for_class(
            MemorySink, {"name": "warnings", "batch_max_wait": 0.01, "types": "Warning"}, type_="memory"
        ),
    ]
    router = Router(router_settings(api, tmp_path, data_dir=tmp_path / "data"), specs)
    async with router.running():
        await until(lambda: router.ready()[0], timeout=30)
        for name, count in want.items():
            sink = router.sinks[name]
            assert isinstance(sink, MemorySink)
            await sink.wait_for(count, timeout=30)
        for p in router.pipelines:
            await p.wait_idle(30)
    return router


async def test_after_a_clean_restart_the_sorted_relist_holds_back_nothing_a_filtering_sink_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1,000 retained events, one in ten a Warning. After a clean restart every sink has what it
    takes, yet the 900 Normal ones the Warning sink never records were "needed" again: held back by
    the sorted relist (memory, its temporary file) and offered once more. Now none is."""
    held = [0]
    original = RelistOrder.add

    def add(order: RelistOrder, occ: Occurrence, *args: Any) -> None:
        held[0] += 1
        original(order, occ, *args)

    monkeypatch.setattr(RelistOrder, "add", add)
    async with FakeApiServer() as api:
        for i in range(1000):
            api.create_event(event_object(object_name=f"p{i}", type="Normal" if i % 10 else "Warning"))
        first = await _run(api, tmp_path, {"ordered": 1000, "warnings": 100})
        assert held[0] == 1000  # the first start sorts them all
        assert first.metrics.filtered.labels("warnings")._value.get() == 900
        held[0] = 0
        again = await _run(api, tmp_path, {})
        assert held[0] == 0
        # Offered again at once, each skipped (accepted) or filtered as before, none delivered twice.
        assert again.metrics.skipped.labels("ordered")._value.get() == 1000
        assert again.metrics.skipped.labels("warnings")._value.get() == 100
        assert again.metrics.filtered.labels("warnings")._value.get() == 900
        for name in ("ordered", "warnings"):
            sink = again.sinks[name]
            assert isinstance(sink, MemorySink) and sink.received == []
