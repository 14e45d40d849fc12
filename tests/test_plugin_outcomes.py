"""A plugin sink's answers that break the send contract, and a plugin rebuilt from a rotated file
whose ``start()`` fails, in a whole Router against the project's Kubernetes API test server, with a
file sink beside the plugin: the router and the other sink go on, and the faults are counted.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from pydantic import Field

from eventrouter.app import Router
from eventrouter.config import build_specs, spec_for_class
from eventrouter.options import Secret, SinkOptions
from eventrouter.record import Occurrence
from eventrouter.sink import Outcome, OutcomeKind, RetryableError, Sink, SinkError, reject, retry
from eventrouter.testing import MemorySink, MemorySinkOptions, event_object
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.routers import router_settings
from eventrouter.testing.secret_volume import SecretVolume
from eventrouter.testing.waiting import until

# Quick retries: a wrong Retry-After that were taken (30 s) would hold the plugin past the test.
QUICK = {"batch_max_wait": 0.02, "retry_initial_backoff": 0.05, "retry_max_backoff": 0.2}


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(token="t") as server:
        server.bookmark_interval = 0.2
        yield server


def _send_errors(router: Router, kind: str, sink: str = "plugin") -> float:
    value = router.metrics.registry.get_sample_value(
        "eventrouter_sink_send_errors_total", {"sink": sink, "kind": kind}
    )
    return value or 0.0


def _lines(path: Path) -> list[dict[str, Any]]:
    """The file sink's complete lines: read while it appends, the last may be cut short (a reader
    can see part of a write to a regular file)."""
    if not path.exists():
        return []
    *complete, _rest = path.read_bytes().split(b"\n")
    return [json.loads(line) for line in complete]


# ---- answers that break the contract ----------------------------------------------------------------


class _Throttled(RetryableError):
    """A plugin's own RetryableError that does not call its ``__init__`` (no reason, no retry_after)."""

    def __init__(self) -> None:
        Exception.__init__(self, "throttled")


def _bad(**fields: Any) -> Outcome:
    return Outcome(**fields)  # the types a plugin's author got wrong; unchecked at run time


# answer → (the first two sends' outcome for each item, or the exception they raise; contract errors)
ANSWERS: dict[str, tuple[Outcome | Exception, int]] = {
    # The Retry-After header's text passed on, or a timedelta: the pipeline task crashed.
    "retry_after_text": (retry("429 from upstream", retry_after="30"), 2),  # type: ignore[arg-type]
    "retry_after_timedelta": (_bad(kind=OutcomeKind.RETRY, retry_after=datetime.timedelta(seconds=30)), 2),
    "raised_retry_after_text": (RetryableError("429 from upstream", retry_after="30"), 2),  # type: ignore[arg-type]
    "raised_without_init": (_Throttled(), 0),  # AttributeError in the engine's except branch
    "defer_text": (_bad(kind=OutcomeKind.RETRY, reason="busy", defer=""), 2),  # int += str
    # The exception as the reason: orjson refused it in the dead-letter writer.
    "reject_exception": (_bad(kind=OutcomeKind.REJECT, reason=ValueError("bad doc")), 2),
    # A str, but one orjson refuses too (a body decoded with surrogateescape): no contract fault.
    "reject_surrogate": (reject("bad \udcff doc"), 0),
    # Outcome("ok"): taken as a retry with no reason, and an accepted batch resent for ever.
    "kind_text": (_bad(kind="ok"), 2),
    "kind_none": (_bad(kind=None), 2),  # names no kind: the batch is retried, counted
}


class _AnswerOptions(SinkOptions):
    answer: str = Field(description="Which malformed answer the first two sends give (ANSWERS).")


class _Answering(Sink[_AnswerOptions]):
    """A third-party sink whose first two sends answer as ``answer`` says; later sends take all."""

    options_model = _AnswerOptions

    def __init__(self, options: _AnswerOptions, context: Any) -> None:
        super().__init__(options, context)
        self.sent: list[list[str]] = []  # the keys of each send
        self.taken: list[str] = []

    async def send(self, batch: Sequence[Occurrence]) -> Sequence[Outcome] | None:
        self.sent.append([occ.key for occ in batch])
        if len(self.sent) > 2:
            self.taken.extend(occ.key for occ in batch)
            return None
        answer, _ = ANSWERS[self.options.answer]
        if isinstance(answer, Exception):
            raise answer
        if self.options.answer == "kind_text":  # what the plugin means, and what the engine now takes
            self.taken.extend(occ.key for occ in batch)
        return [answer] * len(batch)


@pytest.mark.parametrize("answer", list(ANSWERS))
async def test_a_plugins_malformed_answer_stops_neither_the_router_nor_the_sink_beside_it(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture, answer: str
) -> None:
    """Before, each of these but ``kind_*`` ended the pipeline task with a TypeError (orjson's, or a
    comparison's; ``raised_without_init`` an AttributeError): the router stopped, and crashed again
    after each restart as the same items came back. ``kind_text`` resent an accepted batch for ever,
    ``kind_none`` retried it; neither was counted."""
    _, contract = ANSWERS[answer]
    out = tmp_path / "events.jsonl"
    specs = [
        spec_for_class(_Answering, {"name": "plugin", "answer": answer, **QUICK}, type_="answering"),
        *build_specs([f"file:{out}?batch_max_wait=0.02"]),
    ]
    router = Router(router_settings(api, tmp_path, data_dir=tmp_path / "data"), specs)
    async with router.running():
        plugin = router.sinks["plugin"]
        assert isinstance(plugin, _Answering)
        for i in range(5):
            api.create_event(event_object(object_name=f"first-{i}"))
        await until(lambda: len(plugin.sent) >= 1)
        for i in range(5):
            api.create_event(event_object(object_name=f"later-{i}"))
        await until(lambda: len(_lines(out)) == 10)
        keys = {line["uid"] + "/" + str(line["count"]) for line in _lines(out)}
        rejecting = answer.startswith("reject")

        def refused() -> set[str]:
            return {key for send in plugin.sent[:2] for key in send} if rejecting else set()

        await until(lambda: set(plugin.taken) | refused() == keys)
        assert not router.stopped.is_set() and router.exit_code == 0
        dead = _lines(tmp_path / "data" / "deadletter" / "plugin.jsonl")
        assert {d["key"] for d in dead} == refused()
        if rejecting:
            assert {d["reason"] for d in dead} == {"bad doc" if answer == "reject_exception" else "bad ? doc"}
        assert sorted(plugin.taken) == sorted(set(plugin.taken))  # each taken once
        if answer == "kind_text":  # taken at its first send, not sent again
            assert sum(map(len, plugin.sent)) == 10
        assert _send_errors(router, "contract") == contract
        assert _send_errors(router, "contract", "file") == 0
    assert router.exit_code == 0
    said = [
        r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith("sink plugin broke the outcome contract")
    ]
    assert len(said) == (1 if contract else 0), said  # once, though the plugin broke it twice
    if answer == "retry_after_text":
        assert said[0] == (
            "sink plugin broke the outcome contract in its outcomes (each fault logged once; counted in "
            'eventrouter_sink_send_errors_total{kind="contract"}): a retry_after of type str, not '
            "seconds as a number: ignored, the backoff applies"
        )
    if answer == "kind_text":
        assert "the kind as the string 'ok', taken as OutcomeKind.OK" in said[0]


# ---- a rebuilt instance whose start fails --------------------------------------------------------------


class _KeyOptions(MemorySinkOptions):
    api_key: Secret


class _Keyed(MemorySink):
    """A plugin whose ``start`` checks its key with the destination (``accepted``), as a client
    library's login does. Every instance is kept in ``instances``."""

    options_model = _KeyOptions  # type: ignore[assignment]  # a narrower model, as a plugin has
    accepted: set[str] = set()
    instances: list[_Keyed] = []

    def __init__(self, options: _KeyOptions, context: Any) -> None:
        super().__init__(options, context)
        self.key = options.api_key.get_secret_value()
        self.starts = 0
        self.took_over_from: MemorySink | None = None
        _Keyed.instances.append(self)

    async def start(self) -> None:
        self.starts += 1
        if self.key not in _Keyed.accepted:
            raise SinkError("the destination refuses this api_key")
        await super().start()

    def take_over(self, previous: Sink[Any]) -> None:
        assert isinstance(previous, MemorySink)
        self.took_over_from = previous


async def test_a_rebuilt_instance_that_cannot_start_leaves_the_working_one_sending_until_it_can(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A rotated file with which the sink cannot start (a CA file that is no PEM, a key the
    destination does not take yet): the working instance was closed before the new one started,
    and the sink delivered nothing until the next restart. Now the working one goes on; the new one
    is tried again at later sends and takes over once it starts; a newer file replaces it."""
    _Keyed.accepted, _Keyed.instances = {"key-one"}, []
    volume = SecretVolume(tmp_path / "secrets", {"api-key": "key-one"})
    out = tmp_path / "events.jsonl"
    entry = {"name": "plugin", "api_key": f"file:{volume.file('api-key')}", **QUICK}
    specs = [spec_for_class(_Keyed, entry, type_="keyed"), *build_specs([f"file:{out}?batch_max_wait=0.02"])]
    router = Router(router_settings(api, tmp_path, reload_interval=0.05), specs)

    def reloads() -> float:
        value = router.metrics.registry.get_sample_value(
            "eventrouter_sink_reloads_total", {"sink": "plugin", "result": "applied"}
        )
        return value or 0.0

    async def events(tag: str, total: int) -> None:
        for i in range(5):
            api.create_event(event_object(object_name=f"{tag}-{i}"))
        await until(lambda: len(_lines(out)) == total)

    async with router.running():
        (first,) = _Keyed.instances
        await events("before", 5)
        await until(lambda: len(first.received) == 5)
        volume.update({"api-key": "key-two"})  # not taken by the destination yet
        await until(lambda: reloads() == 1)
        await events("refused", 10)
        await until(lambda: len(first.received) == 10)  # before: 0 of these 5, the sink down
        second = _Keyed.instances[1]
        assert second.starts >= 1 and not second.started and not first.closed
        assert router.sinks["plugin"] is first
        volume.update({"api-key": "key-three"})  # another file, not taken either
        await until(lambda: reloads() == 2)
        await events("again", 15)
        await until(lambda: len(first.received) == 15)
        third = _Keyed.instances[2]
        assert second.closed == 1 and second.received == []  # replaced before it could start
        assert third.starts >= 1 and not third.started
        _Keyed.accepted.add("key-three")  # the destination takes it now: no file change needed

        async def one_more(total: int) -> None:
            api.create_event(event_object(object_name=f"after-{total}"))
            await until(lambda: len(first.received) + len(third.received) == total)

        sent = 15
        while not third.received and sent < 100:  # tried again at a send once its backoff passed
            sent += 1
            await one_more(sent)
        assert third.received and router.sinks["plugin"] is third and third.took_over_from is first
        assert (first.closed, len(first.received)) == (1, sent - 1)
        assert _send_errors(router, "start") == second.starts + third.starts - 1 >= 2
        await events("after", sent + 5)
        await until(lambda: len(third.received) == 6)
        assert not router.stopped.is_set()
    keys = [k for s in (first, third) for k in s.keys]
    assert len(keys) == sent + 5 and len(set(keys)) == sent + 5
    said = [r.getMessage() for r in caplog.records if "cannot start" in r.getMessage()]
    assert said and all(
        m.startswith(
            "sink plugin: the instance rebuilt with its re-read options cannot start: the destination "
            "refuses this api_key; the previous instance goes on sending (the rebuilt one is tried again"
        )
        for m in said
    ), said
    assert "key-two" not in caplog.text and "key-three" not in caplog.text
