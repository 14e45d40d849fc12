"""Configurations read as they were meant (session 29's review of items 199 and 202):

- a sink whose spool is turned off at a restart leaves its neighbours their spool room, the data dir
  still within ``--data-dir-max-bytes``;
- a header typed as a YAML flow key (``{Authorization:Bearer TOKEN}``) is refused without printing
  the credential;
- kube-eventer's ``header=Authorization=Bearer+TOKEN`` is ``Bearer TOKEN``, other ``+`` refused;
- a keep list of which some names are excluded is valid, one wholly excluded is not;
- a webhook's ``?token=`` stays in its URL (Google Chat's ``?key=&token=``).

Through the real command line (``python -m eventrouter.cli``), a whole Router on the project's
FakeApiServer, and the webhook sink against its test receiver."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from eventrouter.app import Router, RouterSettings
from eventrouter.config import ConfigError, build_specs, spec_for_class
from eventrouter.engine.filter import compile_filter
from eventrouter.engine.spool import Spool
from eventrouter.sink import OK, SinkContext
from eventrouter.source.watcher import WatchSettings
from eventrouter.testing import FakeApiServer, MemorySink, event_object, make_occurrence
from eventrouter.testing.receivers.webhook import WebhookReceiver
from eventrouter.testing.waiting import until

SECRET = "S3cretTok123"
"""A credential's value: it must appear in no output."""


def _check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "eventrouter.cli", "check", "--offline", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ),
    )


# ---- a spool turned off: its folder counted once (item 202 part 3) --------------------------------


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(token="t") as server:
        server.bookmark_interval = 0.5
        yield server


def _down(name: str, **opts: Any) -> Any:
    """A sink that is down: everything it is given waits in its spool."""
    entry = {"name": name, "batch_max_wait": 0.01, "queue_max_events": 10, "batch_max_events": 5}
    return spec_for_class(MemorySink, {**entry, "fail": True, **opts}, type_="memory")


def _held(folder: Path) -> tuple[int, int]:
    spool = Spool(folder, max_bytes=1 << 40)
    count, size = len(spool) + spool.parked_count, spool.bytes
    spool.close()
    return count, size


def _on_disk(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


async def test_a_spool_turned_off_leaves_its_neighbour_the_room_it_holds_and_the_data_dir_its_budget(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """Its folder was taken out of --data-dir-max-bytes while the sink kept its whole share, whose
    spool room the folder fills: counted twice, sink b's spool limit fell below what b held, and
    its next spill dropped its oldest records (the review's run: 389 of 760)."""
    budget = 512 * 1024
    data = tmp_path / "data"
    settings = RouterSettings(
        kubeconfig=str(api.kubeconfig(tmp_path / "kubeconfig")),
        metrics_addr=None,
        data_dir=data,
        data_dir_max_bytes=budget,
        shutdown_timeout=0.5,
        watch=WatchSettings(watch_timeout=30, backoff_initial=0.05, backoff_max=0.5),
    )
    first = Router(settings, [_down("a"), _down("b")])
    task = asyncio.create_task(first.run())
    try:
        await until(lambda: first.ready()[0], timeout=20)
        limit = first.pipelines[0].spool.max_bytes  # type: ignore[union-attr]
        assert [p.spool.max_bytes for p in first.pipelines] == [limit, limit]  # type: ignore[union-attr]
        # Both spools filled to 85-95% of their limit (20 events are well under 10% of it).
        created = 0
        while min(p.spool.bytes for p in first.pipelines) < 0.85 * limit:  # type: ignore[union-attr]
            for _ in range(20):
                api.create_event(event_object(object_name=f"o-{created}", message="x" * 200))
                created += 1

            def spooled(n: int = created) -> bool:
                return all(p.depth >= n for p in first.pipelines)

            await until(spooled, timeout=20)
    finally:
        first.request_stop()
        await asyncio.wait_for(task, 30)
    a_count, a_bytes = _held(data / "spool" / "a")
    b_count, b_bytes = _held(data / "spool" / "b")
    assert a_count == b_count == created and 0.85 * limit <= b_bytes <= limit

    again = Router(settings, [_down("a", spool_max_bytes=0), _down("b")])
    task = asyncio.create_task(again.run())
    try:
        await until(lambda: again.ready()[0], timeout=20)
        a, b = again.pipelines
        assert a.spool is None and b.spool is not None
        assert b.spool.max_bytes >= b_bytes, (b.spool.max_bytes, b_bytes)  # 112 KiB < 157 KiB before

        def dropped() -> float:
            return again.metrics.dropped.labels("b", "spool_full")._value.get()  # type: ignore[no-any-return]

        for i in range(5):
            api.create_event(event_object(object_name=f"n-{i}", message="y" * 200))
        await until(lambda: b.depth >= created + 5 or dropped() > 0, timeout=20)
        assert dropped() == 0
    finally:
        again.request_stop()
        await asyncio.wait_for(task, 30)
    assert again.metrics.orphaned.labels("a")._value.get() == a_count  # still reported
    assert _held(data / "spool" / "b")[0] == created + 5
    assert _on_disk(data) <= budget, (_on_disk(data), budget, a_bytes)


# ---- a header typed as a YAML flow key ------------------------------------------------------------


@pytest.mark.parametrize(
    ("sink", "says"),
    [
        (
            f'{{type: webhook, url: "https://x.example/h", headers: {{Authorization:Bearer {SECRET}}}}}',
            "headers: '<key #1 Authorization:… (the rest not shown) is not a header name: YAML needs a "
            "space after the colon>' is not a valid header name",
        ),
        (
            f'{{type: loki, url: "https://x.example:3100", headers: {{X-Api-Key:{SECRET}}}}}',
            "option 'headers': Value error, '<key #1 X-Api-Key:… (the rest not shown) is not a header "
            "name: YAML needs a space after the colon>'",
        ),
        (
            f'{{type: webhook, url: "https://x.example/h", headers: {{"X-Api-Key: {SECRET}": ""}}}}',
            "'<key #1 X-Api-Key:… (the rest not shown) is not a header name>' is not a valid header name",
        ),
        (
            f'{{type: webhook, url: "https://x.example/h", headers: {{"Bearer {SECRET}": x}}}}',
            "'<key #1 is not a header name>' is not a valid header name",
        ),
        (  # any mapping option: the location of pydantic's error past the option is masked too
            f'{{type: loki, url: "https://x.example:3100", labels: {{team:{SECRET}}}}}',
            "option 'labels.team:… (the rest not shown)': Input should be a valid string",
        ),
    ],
    ids=["webhook", "loki", "key-with-value", "no-name", "loki-labels"],
)
def test_a_header_typed_as_a_yaml_flow_key_is_refused_without_its_credential(
    tmp_path: Path, sink: str, says: str
) -> None:
    """The key "Authorization:Bearer TOKEN" (no space after the colon in a flow mapping), its
    value null, was printed whole by the exit-2 message: into the pod log and whatever ships it."""
    config = tmp_path / "c.yaml"
    config.write_text(f"sinks:\n  - {sink}\n")
    result = _check(f"--config={config}")
    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    assert says in out, out
    assert SECRET not in out and "Traceback" not in out, out


# ---- kube-eventer's header=Authorization=Bearer+TOKEN ---------------------------------------------


async def test_kube_eventers_bearer_plus_token_header_is_sent_as_bearer_space_token() -> None:
    """A `+` in a query is a space (kube-eventer's Go url.Query too): item 199 refused any `+` in a
    credential, this working migrated flag included, and its advice (%2B) sent "Bearer+abc123"."""
    async with WebhookReceiver() as hook:
        (spec,) = build_specs([f"webhook:{hook.url}?header=Authorization=Bearer+{SECRET}&mode=event"])
        (colon,) = build_specs([f"webhook:{hook.url}?headers=Proxy-Authorization:basic+{SECRET}"])
        assert colon.options.headers["Proxy-Authorization"].get_secret_value() == f"basic {SECRET}"  # type: ignore[attr-defined]
        context = SinkContext(
            name="webhook", cluster="c", data_dir=None, logger=logging.getLogger("test"), send_timeout=30.0
        )
        sink = spec.build(context)
        await sink.start()
        try:
            assert await sink.send([make_occurrence(object_name="pod-1")]) in (None, [OK])
        finally:
            await sink.aclose()
    (request,) = hook.requests
    assert request.headers["Authorization"] == f"Bearer {SECRET}"


@pytest.mark.parametrize(
    ("flag", "option"),
    [
        ("webhook:https://h.example/x?header=Content-Type=application/cloudevents+json", "header"),
        (f"webhook:https://h.example/x?header=X-Api-Key=k3y+{SECRET}", "header"),  # a base64 value
        (f"webhook:https://h.example/x?header=Authorization=Bearer+k3y+{SECRET}", "header"),
        (f"webhook:https://h.example/x?header=Authorization=Bearer+{SECRET}&header=X-Key=a+b", "header"),
        (f"loki:http://l:3100?bearer_token=k3y+{SECRET}", "bearer_token"),
    ],
    ids=["media-type", "base64", "two-plus", "another-value", "credential"],
)
def test_any_other_plus_in_a_query_credential_is_refused_saying_how_to_write_a_space_and_a_plus(
    flag: str, option: str
) -> None:
    result = _check(f"--sink={flag}")
    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    assert (
        f"option {option!r}: a + in a query reads as a space: write %20 for a space, %2B for a plus, "
        "or use env:/file:"
    ) in out, out
    assert SECRET not in out, out


# ---- a keep list partly excluded ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "kept", "dropped"),
    [
        ("kinds=Pod,Node&exclude_kinds=Pod", {"kind": "Node"}, {"kind": "Pod"}),
        (
            "namespaces=default,kube-system&exclude_namespaces=kube-system",
            {"namespace": "default"},
            {"namespace": "kube-system"},
        ),
        ("reasons=BackOff,Failed&exclude_reasons=backoff", {"reason": "Failed"}, {"reason": "BackOff"}),
    ],
    ids=["kinds", "namespaces", "reasons"],
)
def test_a_keep_list_of_which_some_names_are_excluded_is_valid_and_the_exclusion_wins(
    query: str, kept: dict[str, str], dropped: dict[str, str]
) -> None:
    """Refused since item 199 though the sink still received the other names, as a mechanical
    translation of a KEE route tree (a drop under a match listing the same name) gives."""
    (spec,) = build_specs([f"stdout:?{query}"])
    keeps = compile_filter(spec.filter)
    assert keeps is not None
    assert keeps(make_occurrence(**kept)) and not keeps(make_occurrence(**dropped))


@pytest.mark.parametrize(
    ("query", "says"),
    [
        ("kinds=Pod&exclude_kinds=Pod", "kinds keeps 'Pod' and exclude_kinds drops it"),
        (
            "kinds=Pod,Node&exclude_kinds=node,Pod",
            "kinds keeps 'Pod', 'Node' and exclude_kinds drops them all: the sink would receive nothing",
        ),
        (
            "namespaces=kube-system,kube-public&exclude_namespaces=kube-*",
            "namespaces keeps 'kube-system', 'kube-public' and exclude_namespaces drops them all",
        ),
    ],
)
def test_a_keep_list_wholly_excluded_is_refused(query: str, says: str) -> None:
    with pytest.raises(ConfigError) as refused:
        build_specs([f"stdout:?{query}"])
    assert says in str(refused.value)


# ---- a webhook's ?token= ----------------------------------------------------------------------------


async def test_a_webhooks_token_query_key_stays_in_its_url_and_no_bearer_header_is_sent() -> None:
    """`token` was an alias of bearer_token: Google Chat's `?key=K&token=T` lost its token to an
    `Authorization: Bearer` header (every message refused), against docs/migration.md."""
    async with WebhookReceiver() as hook:
        (spec,) = build_specs([f"webhook:{hook.url}?key=K1&token={SECRET}%3D&mode=event"])
        assert spec.options.bearer_token is None  # type: ignore[attr-defined]
        context = SinkContext(
            name="webhook", cluster="c", data_dir=None, logger=logging.getLogger("test"), send_timeout=30.0
        )
        sink = spec.build(context)
        await sink.start()
        try:
            assert await sink.send([make_occurrence(object_name="pod-1")]) in (None, [OK])
        finally:
            await sink.aclose()
    (request,) = hook.requests
    assert request.query == f"key=K1&token={SECRET}%3D"
    assert "Authorization" not in request.headers


def test_a_query_key_kept_in_a_webhooks_url_with_an_env_reference_is_refused() -> None:
    """Sent on as the text "env:TOKEN" once `token` is no option: refused naming the key."""
    result = _check("--sink=webhook:https://h.example/x?token=env:HOOK_TOKEN")
    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    assert (
        "query key 'token' is no option of this sink: it stays in the URL as written, where env: and "
        "file: are not read"
    ) in out, out
    (spec,) = build_specs(["webhook:https://h.example/x?bearer_token=env:HOME"])
    assert spec.options.bearer_token is not None  # type: ignore[attr-defined]
