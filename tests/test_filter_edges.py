"""Filter values that matched everything or nothing without a word (session 22 review)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from eventrouter.app import Router
from eventrouter.config import build_specs, spec_for_class
from eventrouter.engine.filter import compile_filter
from eventrouter.testing import MemorySink, event_object, make_occurrence
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.routers import router_settings
from eventrouter.testing.waiting import until


@pytest.mark.parametrize(
    "flag",
    [
        "stdout:?exclude_message=",
        "stdout:?message=",
        "stdout:?message_regex=",
        "stdout:?exclude_message=&message=",
    ],
)
def test_an_empty_message_or_exclude_message_is_unset_like_an_empty_list(flag: str) -> None:
    """The empty regex matches every message: `exclude_message=` (a Helm value left blank) dropped
    everything, counted only as filtered, while the docs say empty means no restriction."""
    (spec,) = build_specs([flag])
    assert spec.filter.message is None and spec.filter.exclude_message is None
    assert compile_filter(spec.filter) is None
    (spec,) = build_specs([], [{"type": "stdout", "exclude_message": "", "message": ""}])
    assert compile_filter(spec.filter) is None


async def test_a_sink_with_an_empty_exclude_message_receives_every_event(tmp_path: Path) -> None:
    async with FakeApiServer(token="t") as api:
        api.bookmark_interval = 0.2
        for i in range(20):
            api.create_event(event_object(object_name=f"p{i}"))
        settings = router_settings(api, tmp_path)
        spec = spec_for_class(
            MemorySink, {"name": "mem", "batch_max_wait": 0.02, "exclude_message": ""}, type_="memory"
        )
        router = Router(settings, [spec])
        async with router.running():
            sink = router.sinks["mem"]
            assert isinstance(sink, MemorySink)
            await until(lambda: router.ready()[0])
            await sink.wait_for(20)
            assert router.metrics.filtered.labels("mem")._value.get() == 0


@pytest.mark.parametrize(
    ("flag", "kept", "dropped"),
    [
        ("kinds=pod", {"kind": "Pod"}, {"kind": "Node"}),
        ("exclude_kinds=node", {"kind": "Pod"}, {"kind": "Node"}),
        ("reasons=backoff", {"reason": "BackOff"}, {"reason": "Pulled"}),
        ("reasons=oom*", {"reason": "OOMKilling"}, {"reason": "Pulled"}),
        ("exclude_reasons=PULLED", {"reason": "BackOff"}, {"reason": "Pulled"}),
        ("components=Kubelet", {"component": "kubelet"}, {"component": "default-scheduler"}),
        ("namespaces=Kube-*", {"namespace": "kube-system"}, {"namespace": "shop"}),
        ("kinds=Pod", {"kind": "Pod"}, {"kind": "Node"}),  # the exact spelling still matches
    ],
)
def test_names_match_ignoring_case_as_types_do(
    flag: str, kept: dict[str, Any], dropped: dict[str, Any]
) -> None:
    """`kinds=pod` and `reasons=backoff` matched nothing (Kubernetes spells them Pod, BackOff) while
    `types=warning` was taken as Warning: the sink received nothing and nothing said why."""
    (spec,) = build_specs([f"stdout:?{flag}"])
    predicate = compile_filter(spec.filter)
    assert predicate is not None
    assert predicate(make_occurrence(**kept))
    assert not predicate(make_occurrence(**dropped))
