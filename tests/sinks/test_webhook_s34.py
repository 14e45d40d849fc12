"""webhook sink, session 34's review: an error answer whose body cannot be read (stalled after the
head, cut off, or not in its Content-Encoding) is judged by its status, not retried as no answer;
a non-finite ``timeout`` is a configuration error naming it.

Against the project's WebhookReceiver (``fail_next(..., body_fault=...)``: the head sent, none of
the body)."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import aiohttp.http
import pytest
from aiohttp.http_parser import HttpResponseParserPy

from eventrouter import OK, Occurrence, OutcomeKind, RetryableError, SinkContext
from eventrouter.config import ConfigError, build_spec
from eventrouter.plugins import discover
from eventrouter.testing import make_occurrence
from eventrouter.testing.receivers.webhook import WebhookReceiver
from eventrouter.testing.waiting import until
from eventrouter_sinks.webhook import WebhookOptions, WebhookSink

LOG = logging.getLogger("test.webhook.s34")

Unreadable = Literal["gzip", "stall", "cut"]
"""How an answer's body cannot be read: a front's ``Content-Encoding: gzip`` over a plain page, the
head sent and the body stalled, or the connection dropped after the head."""


@asynccontextmanager
async def webhook(**options: Any) -> AsyncIterator[WebhookSink]:
    sink = WebhookSink(WebhookOptions.model_validate(options), SinkContext("webhook", "t", None, LOG))
    try:
        await sink.start()
        yield sink
    finally:
        await sink.aclose()


@pytest.fixture
async def hook() -> AsyncIterator[WebhookReceiver]:
    async with WebhookReceiver() as receiver:
        yield receiver


def fail_unreadable(
    hook: WebhookReceiver, status: int, how: Unreadable, retry_after: str | None = None
) -> None:
    """The next request answered ``status`` with a body the client cannot read."""
    body = b"record 0: field 'reason' too long"
    if how == "gzip":
        hook.fail_next(1, status, retry_after=retry_after, body=body, headers={"Content-Encoding": "gzip"})
    else:
        hook.fail_next(1, status, retry_after=retry_after, body=body, body_fault=how)


def batch(n: int) -> list[Occurrence]:
    return [make_occurrence(object_name=f"pod-{i}") for i in range(n)]


# -- F1: the status decides once it is in -----------------------------------------------------------


@pytest.mark.parametrize("how", ["gzip", "stall", "cut"])
@pytest.mark.parametrize("status", [400, 409, 415, 422])
async def test_a_final_4xx_whose_body_cannot_be_read_is_rejected_with_its_status(
    hook: WebhookReceiver, status: int, how: Unreadable
) -> None:
    """Before, the failed excerpt read was taken for no answer: retried ("no answer within 1s",
    "ClientPayloadError: 400, ..."), for ever with retry_max_attempts=0."""
    fail_unreadable(hook, status, how)
    async with webhook(url=hook.url, mode="event", timeout=1) as sink:
        outcomes = await sink.send(batch(1))
    assert outcomes is not None
    [outcome] = outcomes
    assert outcome.kind is OutcomeKind.REJECT
    assert outcome.reason.startswith(f"HTTP {status} from {hook.url} (its body unreadable: ")
    assert [r.status for r in hook.requests] == [status]


async def test_a_stalled_body_is_waited_for_two_seconds_not_the_whole_timeout(hook: WebhookReceiver) -> None:
    """At the default timeout (10 s) the excerpt gets 2 s; before, the request's whole timeout ran
    out and the 400 was retried as "no answer within 10s"."""
    fail_unreadable(hook, 400, "stall")
    async with webhook(url=hook.url, mode="event") as sink:
        outcomes = await sink.send(batch(1))
    assert outcomes is not None
    assert outcomes[0].kind is OutcomeKind.REJECT
    assert outcomes[0].reason == f"HTTP 400 from {hook.url} (its body unreadable: none of it within 2s)"


@pytest.mark.parametrize("how", ["gzip", "stall", "cut"])
@pytest.mark.parametrize("status", [400, 413])
async def test_a_batch_refused_with_an_unreadable_body_is_halved(
    hook: WebhookReceiver, status: int, how: Unreadable
) -> None:
    """A 413 (a body limit) or a 400 (one record refused) to a batch is sent again in halves. Before,
    the unreadable answer raised RetryableError for the whole batch at every attempt: a front
    answering 413 at the head and closing held the sink on that batch for ever."""
    fail_unreadable(hook, status, how)
    occs = batch(4)
    async with webhook(url=hook.url, timeout=1) as sink:
        assert await sink.send(occs) == [OK] * 4
    assert [r.status for r in hook.requests] == [status, 200, 200]
    assert [len(r.json()) for r in hook.accepted] == [2, 2]


@pytest.mark.parametrize("how", ["gzip", "stall", "cut"])
@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_is_honoured_when_the_body_cannot_be_read(
    hook: WebhookReceiver, status: int, how: Unreadable
) -> None:
    """Before, retry_after was None: the sink hammered a receiver that asked for a pause."""
    fail_unreadable(hook, status, how, retry_after="120")
    async with webhook(url=hook.url, mode="event", timeout=1) as sink:
        outcomes = await sink.send(batch(1))
    assert outcomes is not None
    assert outcomes[0].kind is OutcomeKind.RETRY
    assert outcomes[0].retry_after == 120
    assert outcomes[0].reason.startswith(f"HTTP {status} from {hook.url} (its body unreadable: ")


async def test_a_batch_answered_429_with_an_unreadable_body_raises_with_its_retry_after(
    hook: WebhookReceiver,
) -> None:
    fail_unreadable(hook, 429, "cut", retry_after="120")
    async with webhook(url=hook.url, timeout=1) as sink:
        with pytest.raises(RetryableError, match="HTTP 429") as info:
            await sink.send(batch(3))
    assert info.value.retry_after == 120


async def test_a_readable_error_body_is_still_quoted(hook: WebhookReceiver) -> None:
    hook.fail_next(1, 422, body=b"field 'reason' too long")
    async with webhook(url=hook.url, mode="event") as sink:
        outcomes = await sink.send(batch(1))
    assert outcomes is not None
    assert outcomes[0].kind is OutcomeKind.REJECT
    assert outcomes[0].reason == f"HTTP 422 from {hook.url}: field 'reason' too long"


# -- F2: no infinite timeout ------------------------------------------------------------------------


def config_error(**entry: Any) -> str:
    """The configuration error (exit 2) for a sink entry, as `eventrouter run` prints it."""
    with pytest.raises(ConfigError) as info:
        build_spec(entry, where="sink", plugins=discover())
    return str(info.value)


@pytest.mark.parametrize("value", ["inf", "1e309", "-inf", math.inf], ids=["inf", "1e309", "-inf", "float"])
def test_a_webhook_timeout_that_is_not_finite_is_a_configuration_error(value: object) -> None:
    """Before, it passed: every request then raised OverflowError out of send, naming no option,
    and nothing was delivered."""
    message = config_error(type="webhook", url="http://127.0.0.1:9/hook", timeout=value)
    assert "option 'timeout'" in message
    assert "finite" in message


@pytest.mark.parametrize(
    ("entry", "option"),
    [
        ({"type": "file", "path": "/tmp/events.jsonl", "max_bytes": "1e309"}, "max_bytes"),
        ({"type": "file", "path": "/tmp/events.jsonl", "max_bytes": "1e309Mi"}, "max_bytes"),
        ({"type": "file", "path": "/tmp/events.jsonl", "max_bytes": math.inf}, "max_bytes"),
        ({"type": "file", "path": "/tmp/events.jsonl", "max_files": math.inf}, "max_files"),
    ],
)
def test_the_file_sinks_numbers_refuse_infinity_too(entry: dict[str, Any], option: str) -> None:
    """The other numeric options of the webhook/file/stdout sinks (stdout has none): refused already."""
    assert f"option '{option}'" in config_error(**entry)


# -- item 291: what aiohttp's parser raises, and says, of a malformed body --------------------------

PARSER = "python" if aiohttp.http.HttpResponseParser is HttpResponseParserPy else "c"
"""aiohttp's HTTP parser in this process: its C extension, or its pure-Python one
(``AIOHTTP_NO_EXTENSIONS=1``, a platform without its wheel): ``test_..._with_the_pure_python_parser``
runs the tests below with that one too."""

MALFORMED = {
    "c": "Invalid character in chunk size (HttpProcessingError)",
    "python": "not valid chunked encoding (TransferEncodingError)",
}
"""What the reason says of a bad chunk-size line after the head, by parser."""

TOKEN = "tok_9f8e7d6c5b4a39281706f5e4d3c2b1a0"


def reading_the_body(task: asyncio.Task[Any]) -> bool:
    """``task`` waits for an answer's body (aiohttp's StreamReader): its head is in."""
    at: object = task.get_coro()
    while at is not None:
        code = getattr(at, "cr_code", None)
        if code is not None and code.co_qualname == "StreamReader._wait":
            return True
        at = getattr(at, "cr_await", None)
    return False


@pytest.mark.parametrize("status", [400, 429])
@pytest.mark.parametrize("parser", [PARSER])
async def test_a_malformed_chunked_body_after_the_head_is_judged_by_its_status(
    hook: WebhookReceiver, parser: str, status: int
) -> None:
    """The body's first chunk-size line is no chunk size. With the pure-Python parser its
    TransferEncodingError (no ClientError) left ``send``: the engine counted a sink's bug and sent the
    batch again, a final 400 for ever, a 429's Retry-After lost. With the C parser the read was never
    told (aiohttp sets the error on the connection): "none of it within 2s", 2 s later. Never the
    line itself: a gateway's page may quote our credential, cut anywhere."""
    hook.fail_next(1, status, body=b"record 0 refused", retry_after="120", body_fault="bad-chunk-later")
    async with webhook(url=hook.url, mode="event") as sink:
        send = asyncio.create_task(sink.send(batch(1)))
        await until(lambda: send.done() or reading_the_body(send))
        hook.release_bodies()
        outcomes = await send
    assert outcomes is not None
    [outcome] = outcomes
    assert outcome.kind is (OutcomeKind.REJECT if status == 400 else OutcomeKind.RETRY)
    assert outcome.reason == f"HTTP {status} from {hook.url} (its body unreadable: {MALFORMED[parser]})"
    assert outcome.retry_after == (120 if status == 429 else None)


@pytest.mark.parametrize("parser", [PARSER])
async def test_a_parser_error_never_quotes_a_piece_of_our_token(hook: WebhookReceiver, parser: str) -> None:
    """A 401 whose body, with its head in one segment, echoes half our token as its chunk-size line
    (a gateway quoting the credential it refused, cut by a segment or by the gateway). aiohttp's
    message quoted that line: the half, which no scrub finds as a whole secret, went into the retry
    reason, the "not accepted" warning and a dead letter's reason."""
    hook.fail_next(1, 401, body=f"denied Bearer {TOKEN[: len(TOKEN) // 2]}".encode(), body_fault="bad-chunk")
    async with webhook(url=hook.url, mode="event", bearer_token=TOKEN) as sink:
        outcomes = await sink.send(batch(1))
    assert outcomes is not None
    [outcome] = outcomes
    assert outcome.kind is OutcomeKind.RETRY
    assert "invalid HTTP answer" in outcome.reason
    pieces = [TOKEN[i : i + 8] for i in range(len(TOKEN) - 7)]
    assert [piece for piece in pieces if piece in outcome.reason] == []
    assert "denied" not in outcome.reason


async def test_a_body_cut_by_the_requests_own_timeout_says_so(hook: WebhookReceiver) -> None:
    """The request's timeout (1 s) covers its body too, and runs out before the excerpt's wait (at
    most that, begun once the head is in). The reason said "none of it within 1s", whatever was
    waited for the body."""
    fail_unreadable(hook, 400, "stall")
    async with webhook(url=hook.url, mode="event", timeout=1) as sink:
        outcomes = await sink.send(batch(1))
    assert outcomes is not None
    assert outcomes[0].kind is OutcomeKind.REJECT
    assert outcomes[0].reason == (
        f"HTTP 400 from {hook.url} (its body unreadable: none of it before the request's timeout (1s) ran out)"
    )


def test_the_malformed_bodies_are_judged_so_with_the_pure_python_parser_too() -> None:
    """The two tests above with ``AIOHTTP_NO_EXTENSIONS=1`` (aiohttp's pure-Python parser, on any
    platform without its C wheel: musl without a wheel, PyPy, a free-threaded build), in a process of
    their own: the parser is chosen at aiohttp's import."""
    names = [
        "test_a_malformed_chunked_body_after_the_head_is_judged_by_its_status",
        "test_a_parser_error_never_quotes_a_piece_of_our_token",
    ]
    here = Path(__file__)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-v",
            "-p",
            "no:cacheprovider",
            *(f"{here}::{name}" for name in names),
        ],
        env={**os.environ, "AIOHTTP_NO_EXTENSIONS": "1"},
        cwd=here.parents[2],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for node in (f"{names[0]}[python-400]", f"{names[0]}[python-429]", f"{names[1]}[python]"):
        assert f"::{node} PASSED" in result.stdout, result.stdout


# -- item 296: error answers read after their head on one kept-alive connection -------------------


def marks_on_pooled_connections(sink: WebhookSink) -> list[int]:
    """The callbacks each pooled connection's ``closed`` future holds (aiohttp makes it when asked,
    and it lives as long as the connection)."""
    assert sink._session is not None
    connector = sink._session.connector
    assert isinstance(connector, aiohttp.TCPConnector)
    return [
        len(protocol._closed._callbacks or ())
        for pooled in connector._conns.values()
        for protocol, _ in pooled
        if protocol._closed is not None
    ]


async def test_error_answers_on_one_connection_leave_no_callbacks_behind(hook: WebhookReceiver) -> None:
    """A receiver refusing every record (422, a wrong format) with its head first and its body a
    moment later, on one kept-alive connection. Each such answer added a ``retrieved`` callback (and
    a copied Context) to the connection's ``closed`` future and nothing removed it: one per refused
    record for as long as the connection lived (3,000 refusals, 311 kB), all run at once at its
    close. Now one mark per connection."""
    refusals = 20
    hook.fail_next(refusals, 422, body=b"record 0: field 'reason' is invalid", body_after=0.02)
    async with webhook(url=hook.url, mode="event") as sink:
        for _ in range(refusals):
            [outcome] = await sink.send(batch(1)) or []
            assert outcome.kind is OutcomeKind.REJECT
            assert outcome.reason == f"HTTP 422 from {hook.url}: record 0: field 'reason' is invalid"
        marks = marks_on_pooled_connections(sink)
    assert len(marks) == 1  # every answer on the one kept-alive connection
    assert marks[0] <= 1, marks
