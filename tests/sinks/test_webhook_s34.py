"""webhook sink, session 34's review: an error answer whose body cannot be read (stalled after the
head, cut off, or not in its Content-Encoding) is judged by its status, not retried as no answer;
a non-finite ``timeout`` is a configuration error naming it.

Against the project's WebhookReceiver (``fail_next(..., body_fault=...)``: the head sent, none of
the body)."""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

import pytest

from eventrouter import OK, Occurrence, OutcomeKind, RetryableError, SinkContext
from eventrouter.config import ConfigError, build_spec
from eventrouter.plugins import discover
from eventrouter.testing import make_occurrence
from eventrouter.testing.receivers.webhook import WebhookReceiver
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
