"""A third-party sink that breaks the contract in ways that once stopped the router, hung its stop,
stalled it unseen or printed its secrets (session 32): each must cost only its own sink and be named.
A whole Router against the project's Kubernetes API test server, with a file sink beside the plugin;
the plugins the CLI loads are installed as distributions on a path entry.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from eventrouter.app import Router
from eventrouter.config import build_specs, spec_for_class
from eventrouter.engine.pipeline import CUT_OFF_GRACE
from eventrouter.options import Secret, SinkOptions
from eventrouter.record import Occurrence
from eventrouter.scrub import Scrubber, option_secrets, scrub
from eventrouter.sink import OK, Outcome, Sink
from eventrouter.testing import event_object
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.receivers.webhook import WebhookReceiver
from eventrouter.testing.routers import router_settings
from eventrouter.testing.waiting import until

QUICK = {"batch_max_wait": 0.02, "retry_initial_backoff": 0.05, "retry_max_backoff": 0.2}


class Boom(BaseException):
    """A library's own BaseException subclass (gevent's Timeout, trio's Cancelled are such)."""


RAISED: dict[str, type[BaseException]] = {
    "Boom": Boom,
    "GeneratorExit": GeneratorExit,
    "SystemExit": SystemExit,
    "KeyboardInterrupt": KeyboardInterrupt,
}


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(token="t") as server:
        server.bookmark_interval = 0.2
        yield server


@pytest.fixture
async def sigint_stops() -> AsyncIterator[list[Router]]:
    """SIGINT handled by the event loop, as ``eventrouter run`` does: it stops the router (the one
    put in the list), and no KeyboardInterrupt comes from a signal."""
    routers: list[Router] = []
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, lambda: routers[0].request_stop())
    try:
        yield routers
    finally:
        loop.remove_signal_handler(signal.SIGINT)


def _sample(router: Router, name: str, **labels: str) -> float:
    return router.metrics.registry.get_sample_value(name, labels) or 0.0


def _send_errors(router: Router, kind: str, sink: str = "plugin") -> float:
    return _sample(router, "eventrouter_sink_send_errors_total", sink=sink, kind=kind)


def _lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    *complete, _rest = path.read_bytes().split(b"\n")
    return [json.loads(line) for line in complete]


def _said(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= level]


def _router(api: FakeApiServer, tmp_path: Path, plugin: Any, **settings: Any) -> tuple[Router, Path]:
    out = tmp_path / "events.jsonl"
    specs = [plugin, *build_specs([f"file:{out}?batch_max_wait=0.02"])]
    return Router(router_settings(api, tmp_path, data_dir=tmp_path / "data", **settings), specs), out


# ---- 1. a BaseException that is no Exception -----------------------------------------------------------


class _RaiseOptions(SinkOptions):
    what: str = "Boom"
    where: str = "send"


class _RaisesOnce(Sink[_RaiseOptions]):
    """Raises ``what`` at its first ``where`` (send, start or aclose), then works."""

    options_model = _RaiseOptions

    def __init__(self, options: _RaiseOptions, context: Any) -> None:
        super().__init__(options, context)
        self.calls: collections.Counter[str] = collections.Counter()
        self.taken: list[str] = []

    def _once(self, where: str) -> None:
        self.calls[where] += 1
        if where == self.options.where and self.calls[where] == 1:
            raise RAISED[self.options.what]()

    async def start(self) -> None:
        self._once("start")

    async def send(self, batch: Sequence[Occurrence]) -> Sequence[Outcome] | None:
        self._once("send")
        self.taken.extend(occ.key for occ in batch)
        return None

    async def aclose(self) -> None:
        self._once("aclose")


@pytest.mark.parametrize("where", ["send", "start"])
@pytest.mark.parametrize("what", list(RAISED))
async def test_a_base_exception_from_a_plugin_costs_only_that_call(
    api: FakeApiServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    sigint_stops: list[Router],
    what: str,
    where: str,
) -> None:
    """Before, Boom and GeneratorExit ended the pipeline task unseen (no log line, sink_up 1, nothing
    delivered to the plugin again), and SystemExit and KeyboardInterrupt ended the whole router with
    exit 0 and no line naming the sink. A real SIGINT still stops the router."""
    spec = spec_for_class(_RaisesOnce, {"name": "plugin", "what": what, "where": where, **QUICK}, type_="p")
    router, out = _router(api, tmp_path, spec)
    sigint_stops.append(router)
    async with router.running():
        plugin = router.sinks["plugin"]
        assert isinstance(plugin, _RaisesOnce)
        for i in range(3):
            api.create_event(event_object(object_name=f"first-{i}"))
        await until(lambda: plugin.calls[where] >= 2)
        for i in range(3):
            api.create_event(event_object(object_name=f"later-{i}"))
        await until(lambda: len(_lines(out)) == 6)
        keys = {f"{line['uid']}/{line['count']}" for line in _lines(out)}
        await until(lambda: set(plugin.taken) == keys)
        assert not router.stopped.is_set() and router.exit_code == 0
        assert _send_errors(router, "exception" if where == "send" else "start") == 1
        assert _sample(router, "eventrouter_sink_up", sink="plugin") == 1
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C itself: the router stops, as before
        await until(router.stopped.is_set)
    assert router.exit_code == 0
    errors = _said(caplog, logging.ERROR)
    named = f"sink plugin: send raised {what}" if where == "send" else f"sink plugin cannot start: {what}"
    assert [e for e in errors if e.startswith(named)], errors
    assert not [e for e in errors if "crashed" in e], errors


@pytest.mark.parametrize("what", list(RAISED))
async def test_a_base_exception_from_aclose_at_the_stop_is_named_and_the_stop_finishes(
    api: FakeApiServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    sigint_stops: list[Router],
    what: str,
) -> None:
    spec = spec_for_class(
        _RaisesOnce, {"name": "plugin", "what": what, "where": "aclose", **QUICK}, type_="p"
    )
    router, out = _router(api, tmp_path, spec)
    sigint_stops.append(router)
    async with router.running():
        api.create_event(event_object(object_name="e"))
        await until(lambda: len(_lines(out)) == 1)
    assert router.stopped.is_set() and router.exit_code == 0
    assert (tmp_path / "data" / "checkpoints" / "plugin.snapshot").exists()  # the stop wrote it
    assert _send_errors(router, "exception") == 1
    warnings = _said(caplog, logging.WARNING)
    assert f"sink plugin: closing it raised {what}: " in warnings, warnings


async def test_a_task_ended_by_a_base_exception_stops_the_router_naming_it(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture, sigint_stops: list[Router]
) -> None:
    """What no call site catches: before, a task ended so stayed dead unseen (never retrieved), and
    SystemExit ended the router with exit 0. Now a crash: logged, exit 1, a clean stop."""
    router, _ = _router(api, tmp_path, spec_for_class(_RaisesOnce, {"name": "plugin", **QUICK}, type_="p"))
    sigint_stops.append(router)

    async def ends_so() -> None:
        raise Boom

    async with router.running():
        router._guard(ends_so(), "probe")
        await until(router.stopped.is_set)
    assert router.exit_code == 1
    assert "task probe crashed; stopping the router" in _said(caplog, logging.ERROR)


# ---- 2. a send that swallows its cancellation -------------------------------------------------------------


class _Stubborn(Sink[SinkOptions]):
    """A "retry until answered" send that catches its cancellation and goes on waiting."""

    options_model = SinkOptions
    release = asyncio.Event()
    cancels = 0

    async def send(self, batch: Sequence[Occurrence]) -> Sequence[Outcome] | None:
        while not _Stubborn.release.is_set():
            try:
                await _Stubborn.release.wait()
            except asyncio.CancelledError:
                _Stubborn.cancels += 1
        return None


async def test_a_send_that_swallows_its_cancellation_is_named_and_does_not_hold_the_stop(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, nothing was logged or counted while it ran past send_timeout (sink_up 1), and the stop
    waited for it without bound: no spool, checkpoint or lock release until the kubelet's SIGKILL."""
    _Stubborn.release = asyncio.Event()
    spec = spec_for_class(_Stubborn, {"name": "plugin", "send_timeout": 1, **QUICK}, type_="stubborn")
    router, out = _router(api, tmp_path, spec, shutdown_timeout=1.0)
    try:
        async with router.running():
            for i in range(3):
                api.create_event(event_object(object_name=f"e-{i}"))
            await until(lambda: len(_lines(out)) == 3)
            await until(lambda: _sample(router, "eventrouter_sink_up", sink="plugin") == 0)
            assert _send_errors(router, "timeout") == 1
            assert [
                e for e in _said(caplog, logging.ERROR) if e.startswith("sink plugin: send() did not end")
            ]
            async with asyncio.timeout(30):  # a bound for a hang, not a speed: before, it never ended
                await router.stop()
        assert router.stopped.is_set()
        errors = _said(caplog, logging.ERROR)
        assert [e for e in errors if e.startswith("sink plugin: its send did not end")], errors
        assert _Stubborn.cancels >= 2  # send_timeout's, then the stop's
    finally:
        _Stubborn.release.set()  # let the abandoned send end, as the event loop's teardown waits for it
    # The batch in flight is in the plugin's spool: a restart delivers it.
    delivered: list[str] = []

    class _Taking(Sink[SinkOptions]):
        options_model = SinkOptions

        async def send(self, batch: Sequence[Occurrence]) -> Sequence[Outcome] | None:
            delivered.extend(occ.key for occ in batch)
            return None

    again, _ = _router(api, tmp_path, spec_for_class(_Taking, {"name": "plugin", **QUICK}, type_="taking"))
    async with again.running(watch=False):
        await until(lambda: len(delivered) == 3)
    assert sorted(delivered) == sorted({f"{line['uid']}/{line['count']}" for line in _lines(out)})


class _InnerTimeout(Sink[SinkOptions]):
    """A send whose first request meets its own request timeout (as aiohttp's, Kafka's per-topic
    budget), handled: it goes on with the next endpoint, which answers when the test lets it."""

    options_model = SinkOptions
    timed_out = asyncio.Event()
    answer = asyncio.Event()
    taken: list[str] = []

    async def send(self, batch: Sequence[Occurrence]) -> Sequence[Outcome] | None:
        try:
            async with asyncio.timeout(0.05):
                await asyncio.Event().wait()  # an endpoint that never answers
        except TimeoutError:
            _InnerTimeout.timed_out.set()
        await _InnerTimeout.answer.wait()
        _InnerTimeout.taken.extend(occ.key for occ in batch)
        return None


async def test_a_send_that_handles_its_own_timeout_and_goes_on_is_not_said_to_swallow_a_cancellation(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, the cancellation of its own ``asyncio.timeout`` armed the alarm as send_timeout's would:
    a healthy send still working CUT_OFF_GRACE s later was logged as an ERROR (swallows its
    cancellation), counted as a timeout and shown down."""
    _InnerTimeout.timed_out, _InnerTimeout.answer, _InnerTimeout.taken = asyncio.Event(), asyncio.Event(), []
    spec = spec_for_class(_InnerTimeout, {"name": "plugin", "send_timeout": 30, **QUICK}, type_="inner")
    router, out = _router(api, tmp_path, spec)
    up_while_sending: list[float] = []

    def answer() -> None:
        up_while_sending.append(_sample(router, "eventrouter_sink_up", sink="plugin"))
        _InnerTimeout.answer.set()

    async with router.running():
        for i in range(3):
            api.create_event(event_object(object_name=f"e-{i}"))
        await until(_InnerTimeout.timed_out.is_set)
        # Past the alarm's time: it was set at the cancellation, before this timer (the loop runs
        # timers in order of their time), so it has run, or been disarmed, when the send goes on.
        asyncio.get_running_loop().call_later(CUT_OFF_GRACE + 0.5, answer)
        await until(lambda: len(_InnerTimeout.taken) == 3, timeout=30)
        assert sorted(_InnerTimeout.taken) == sorted(
            {f"{line['uid']}/{line['count']}" for line in _lines(out)}
        )
        assert up_while_sending == [1.0]
        assert _sample(router, "eventrouter_sink_up", sink="plugin") == 1
        assert _send_errors(router, "timeout") == 0
    assert not [
        r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "plugin" in r.getMessage()
    ]


# ---- 3. modified totals of the wrong kind ------------------------------------------------------------------


class _ModOptions(SinkOptions):
    how: str


class _Miscounting(Sink[_ModOptions]):
    options_model = _ModOptions

    def __init__(self, options: _ModOptions, context: Any) -> None:
        super().__init__(options, context)
        self.taken: list[str] = []

    async def send(self, batch: Sequence[Occurrence]) -> Sequence[Outcome] | None:
        self.taken.extend(occ.key for occ in batch)
        how = self.options.how
        if how == "decrement":
            self.modified["truncated"] -= 1
        elif how == "text":
            self.modified["truncated"] = "1"  # type: ignore[assignment]
        else:
            self.modified = len(batch)  # type: ignore[assignment]
        return None


@pytest.mark.parametrize("how", ["decrement", "text", "int"])
async def test_modified_totals_of_the_wrong_kind_are_a_contract_fault_not_a_crash(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    """Before, the pipeline task crashed after a send answered OK: the router stopped (exit 1), and
    the batch, never checkpointed, came again after each restart: a crash loop."""
    spec = spec_for_class(_Miscounting, {"name": "plugin", "how": how, **QUICK}, type_="miscounting")
    router, out = _router(api, tmp_path, spec)
    async with router.running():
        plugin = router.sinks["plugin"]
        assert isinstance(plugin, _Miscounting)
        for i in range(3):
            api.create_event(event_object(object_name=f"first-{i}"))
        await until(lambda: len(plugin.taken) == 3)
        for i in range(3):
            api.create_event(event_object(object_name=f"later-{i}"))
        await until(lambda: len(_lines(out)) == 6 and len(plugin.taken) == 6)
        assert sorted(plugin.taken) == sorted({f"{line['uid']}/{line['count']}" for line in _lines(out)})
        assert not router.stopped.is_set() and router.exit_code == 0
        assert _send_errors(router, "contract") >= 1
    assert router.exit_code == 0
    errors = _said(caplog, logging.ERROR)
    assert len([e for e in errors if "its modified totals (Sink.modified) hold" in e]) == 1, errors


# ---- 4. a plugin's secrets in the errors the router prints ------------------------------------------------

TOKEN = "123456:AAH-s3cr3t-bot-token"


class _BotOptions(SinkOptions):
    bot_token: Secret


class _Bot(Sink[_BotOptions]):
    """Telegram-style: the Secret token is in the request path, and aiohttp's own idiom
    ``raise_for_status()`` puts the URL into the exception's text."""

    options_model = _BotOptions

    def __init__(self, options: _BotOptions, context: Any) -> None:
        super().__init__(options, context)
        self._session: aiohttp.ClientSession | None = None
        self.starts = 0

    def _url(self) -> str:
        return f"{self.options.url}/bot{self.options.bot_token.get_secret_value()}/sendMessage"

    async def start(self) -> None:
        self._session = self._session or aiohttp.ClientSession()
        self.starts += 1
        if self.starts == 1:
            async with self._session.get(self._url()) as resp:  # getMe
                resp.raise_for_status()

    async def send(self, batch: Sequence[Occurrence]) -> Sequence[Outcome] | None:
        assert self._session is not None
        async with self._session.post(self._url(), json={"text": "x"}) as resp:
            resp.raise_for_status()
        return None

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def test_a_plugins_secret_is_in_no_log_line_or_dead_letter_of_the_router(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, the start failure, the send's ERROR and its traceback, the retry warning, the
    dead-letter line and the dead-letter file all held the token, from aiohttp's error text."""
    caplog.set_level(logging.DEBUG)
    async with WebhookReceiver(path=f"/bot{TOKEN}/sendMessage") as hook:
        hook.fail_next(4, 503)
        base = hook.url.rsplit("/bot", 1)[0]
        options = {"name": "bot", "url": base, "bot_token": TOKEN, "retry_max_attempts": 2, **QUICK}
        router, _ = _router(api, tmp_path, spec_for_class(_Bot, options, type_="bot"))
        async with router.running():
            api.create_event(event_object(object_name="e-0"))
            await until(
                lambda: (
                    _sample(
                        router, "eventrouter_sink_dead_lettered_total", sink="bot", reason="retries_exhausted"
                    )
                    == 1
                )
            )
    text = caplog.text  # every record as formatted, with its traceback
    assert TOKEN not in text
    assert "sink bot cannot start: ClientResponseError: 503" in text
    assert "url='http://127.0.0.1:" in text and "/bot****/sendMessage'" in text
    errors = _said(caplog, logging.ERROR)
    assert [e for e in errors if e.startswith("sink bot: send raised ClientResponseError: 503")], errors
    assert [e for e in errors if "dead-lettered, retries exhausted after 2 attempts" in e and "503" in e]
    dead = _lines(tmp_path / "data" / "deadletter" / "bot.jsonl")
    assert len(dead) == 1 and "503" in dead[0]["reason"] and TOKEN not in json.dumps(dead)
    # Its traceback, masked, in that ERROR line: before, at DEBUG only (a bug report said not where).
    for raised in [e for e in errors if e.startswith("sink bot: send raised")]:
        assert "Traceback (most recent call last)" in raised and "in send" in raised
        assert "raise_for_status()" in raised and "/bot****/sendMessage" in raised


@pytest.mark.parametrize(
    "text",
    [
        f"GET /bot{TOKEN}/getMe: 401",
        f"GET /bot{TOKEN.replace(':', '%3A')}/x and {TOKEN} twice {TOKEN}{TOKEN}",
        "no secret here: 123456",
        "",
    ],
)
def test_the_engines_compiled_masker_hides_what_scrub_hides(text: str) -> None:
    """Built once per sink's options (``scrub`` built its forms on every call, twice per rejected
    occurrence): it masks as ``scrub`` does."""
    forms = option_secrets(_BotOptions.model_validate({"url": "http://h", "bot_token": TOKEN}))
    assert Scrubber(forms)(text) == scrub(text, forms)
    assert not Scrubber([])  # no secrets: nothing to do, and the engine logs tracebacks as they are


def test_the_engines_masker_leaves_no_piece_of_overlapping_secrets() -> None:
    """``scrub``, longest secret first, left the start of one the other overlaps ("xab****y")."""
    masked = Scrubber(["abc", "cdef"])("xabcdefy abc")
    assert masked == "x****y ****"


# ---- 5. a plugin that blocks the event loop ----------------------------------------------------------------


class _Blocking(Sink[SinkOptions]):
    """A synchronous client's call in ``send``, for the batch with a "slow" message."""

    options_model = SinkOptions

    async def send(self, batch: Sequence[Occurrence]) -> Sequence[Outcome] | None:
        if any("slow" in occ.record["message"] for occ in batch):
            time.sleep(0.6)  # noqa: ASYNC251 - the fault under test
        return None


async def test_a_plugin_that_blocks_the_event_loop_is_named_and_counted(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, nothing said which sink held the watch, the other sinks and /healthz."""
    router, out = _router(api, tmp_path, spec_for_class(_Blocking, {"name": "plugin", **QUICK}, type_="b"))
    async with router.running():
        api.create_event(event_object(object_name="e", message="slow"))
        await until(
            lambda: _sample(router, "eventrouter_sink_event_loop_blocked_seconds_total", sink="plugin") > 0
        )
        api.create_event(event_object(object_name="f", message="slow"))
        await until(lambda: len(_lines(out)) == 2)
        await until(lambda: _sample(router, "eventrouter_sink_delivered_total", sink="plugin") == 2)
        assert _sample(router, "eventrouter_sink_event_loop_blocked_seconds_total", sink="file") == 0
    warnings = [w for w in _said(caplog, logging.WARNING) if "held the event loop" in w]
    assert len(warnings) == 1, warnings  # at most once a minute
    assert warnings[0].startswith("sink plugin: its send() held the event loop for 0.")
    assert "asyncio.to_thread" in warnings[0]


# ---- 10. messages that named the wrong thing ----------------------------------------------------------------


class _AnswerOptions(SinkOptions):
    answer: str


class _OddAnswer(Sink[_AnswerOptions]):
    options_model = _AnswerOptions
    sends = 0

    async def send(self, batch: Sequence[Occurrence]) -> Any:
        _OddAnswer.sends += 1
        if _OddAnswer.sends > 1:
            return None
        return {"single": OK, "dict": dict.fromkeys(range(len(batch)), OK), "string": "ok"}[
            self.options.answer
        ]


@pytest.mark.parametrize(("answer", "kind"), [("single", "Outcome"), ("dict", "dict"), ("string", "str")])
async def test_an_answer_that_is_no_sequence_is_named_by_its_type(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture, answer: str, kind: str
) -> None:
    """Before: "returned 0 outcomes" for one Outcome, a dict counted by its keys, a text by its
    characters."""
    _OddAnswer.sends = 0
    router, _ = _router(
        api, tmp_path, spec_for_class(_OddAnswer, {"name": "plugin", "answer": answer, **QUICK}, type_="o")
    )
    async with router.running():
        api.create_event(event_object(object_name="e"))
        await until(lambda: _sample(router, "eventrouter_sink_delivered_total", sink="plugin") == 1)
        assert _send_errors(router, "contract") == 1
    assert (
        f"sink plugin returned an object of type {kind} for 1 occurrences, not a sequence of one Outcome "
        "each; retrying the batch"
    ) in _said(caplog, logging.ERROR)


class _SlowStart(Sink[SinkOptions]):
    options_model = SinkOptions
    starts = 0

    async def start(self) -> None:
        _SlowStart.starts += 1
        if _SlowStart.starts == 1:
            await asyncio.Event().wait()

    async def send(self, batch: Sequence[Occurrence]) -> Sequence[Outcome] | None:
        return None


async def test_a_start_that_does_not_finish_is_named_so(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: "sink plugin cannot start: TimeoutError:  (retry in 0.0s)"."""
    _SlowStart.starts = 0
    spec = spec_for_class(_SlowStart, {"name": "plugin", "send_timeout": 0.5, **QUICK}, type_="s")
    router, _ = _router(api, tmp_path, spec)
    async with router.running():
        api.create_event(event_object(object_name="e"))
        await until(lambda: _sample(router, "eventrouter_sink_delivered_total", sink="plugin") == 1)
    errors = [e for e in _said(caplog, logging.ERROR) if e.startswith("sink plugin cannot start")]
    assert errors and errors[0].startswith(
        "sink plugin cannot start: start() did not finish within send_timeout 0.5s (retry in"
    ), errors


# ---- 4, 8, 9: plugins as installed distributions, through the CLI -------------------------------------------

_PLUGINS = """
from __future__ import annotations

from typing import Any

import aiohttp

from eventrouter import Secret, Sink, SinkOptions


class SyncSend(Sink[SinkOptions]):
    def send(self, batch: Any) -> Any:  # a plain def: it delivered on every try
        return None


class AsyncGivenUp(Sink[SinkOptions]):
    async def send(self, batch: Any) -> Any:
        return None

    async def given_up(self, occurrences: Any) -> None:  # never run
        pass


class BotOptions(SinkOptions):
    bot_token: Secret


class Bot(Sink[BotOptions]):
    options_model = BotOptions

    async def check(self) -> None:
        url = f"{self.options.url}/bot{self.options.bot_token.get_secret_value()}/getMe"
        async with aiohttp.ClientSession() as session, session.post(url) as resp:
            resp.raise_for_status()

    async def send(self, batch: Any) -> Any:
        return None
"""


def _install(tmp_path: Path) -> dict[str, str]:
    """A distribution on a path entry, found by importlib.metadata as an installed one is."""
    (tmp_path / "s32plugins.py").write_text(textwrap.dedent(_PLUGINS))
    (tmp_path / "s32_vendor.py").write_text('import sys\nsys.exit("please install the vendor SDK")\n')
    info = tmp_path / "s32plugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: s32plugins\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[eventrouter.sinks]\nsyncsend = s32plugins:SyncSend\nasyncgivenup = s32plugins:AsyncGivenUp\n"
        "bot = s32plugins:Bot\nvendor = s32_vendor:Sink\n"
    )
    return {"PYTHONPATH": str(tmp_path)}


def _eventrouter(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "eventrouter.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )


@pytest.mark.parametrize(
    ("sink", "fault"),
    [
        ("syncsend", "(s32plugins:SyncSend): send must be async def"),
        (
            "asyncgivenup",
            "(s32plugins:AsyncGivenUp): given_up must be a plain def (the engine calls it without awaiting it)",
        ),
    ],
)
def test_a_plugin_method_of_the_wrong_kind_is_refused_at_load(tmp_path: Path, sink: str, fault: str) -> None:
    """Before, `check --offline` said valid, and `run` sent the batch of a plain `def send` again for
    ever (it delivered on every try)."""
    result = _eventrouter("check", "--offline", "--sink", f"{sink}:", env=_install(tmp_path))
    assert result.returncode == 2, result
    assert f"sink {sink!r} from s32plugins 0.1 {fault}" in result.stderr


def test_a_plugin_whose_import_exits_is_named_and_the_others_are_listed(tmp_path: Path) -> None:
    """Before, an SDK's sys.exit() at import ended `eventrouter sinks` (no sink listed) and `check`
    with its text only, exit 1, naming neither the sink nor the package."""
    env = _install(tmp_path)
    listing = _eventrouter("sinks", env=env)
    assert listing.returncode == 0, listing.stderr
    assert (
        "vendor  [broken] sink 'vendor' from s32plugins 0.1 failed to load (s32_vendor:Sink): SystemExit: "
        "please install the vendor SDK"
    ) in listing.stdout
    assert "stdout  (eventrouter " in listing.stdout and "bot  (s32plugins 0.1)" in listing.stdout
    check = _eventrouter("check", "--offline", "--sink", "vendor:", env=env)
    assert check.returncode == 2, check
    assert "sink 'vendor' from s32plugins 0.1 failed to load (s32_vendor:Sink): SystemExit: " in check.stderr


async def test_checks_fail_line_shows_no_secret_of_the_plugin(tmp_path: Path) -> None:
    """Before, `FAIL  bot (...): 503, message=..., url='http://.../bot<token>/getMe'`."""
    env = _install(tmp_path)
    async with WebhookReceiver(path=f"/bot{TOKEN}/getMe") as hook:
        hook.fail_next(1, 503)
        base = hook.url.rsplit("/bot", 1)[0]
        result = await asyncio.to_thread(
            _eventrouter, "check", "--sink", f"bot:{base}?bot_token={TOKEN}", env=env
        )
    assert result.returncode == 1, result
    assert TOKEN not in result.stdout + result.stderr
    assert "FAIL  bot (bot http://127.0.0.1:" in result.stdout
    assert "503, message='Service Unavailable', url='http://127.0.0.1:" in result.stdout
    assert "/bot****/getMe'" in result.stdout
