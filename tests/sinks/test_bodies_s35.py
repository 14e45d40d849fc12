"""Answer bodies, session 35's review (r4bodies F1-F3; item 301).

- F1: an answer labelled with a ``charset`` that is no text encoding (base64, rot13, hex: bytes-to-bytes
  codecs; undefined, idna: text ones that cannot decode with ``errors="replace"``) raised LookupError
  or UnicodeError out of Loki's answer reading, out of ``send``, ``start`` and ``check``: the status
  and Retry-After thrown away (a final 400 retried for ever as a sink bug, a 413 never halved, a
  stored push pushed again). The label is the peer's to choose; the body is now read as UTF-8 then.
- F2: a float option of infinity (``inf``, ``1e309``) passed validation: a robot's ``request_timeout``
  then made every request raise OverflowError out of ``send``, Kafka's ``future_grace`` out of the
  sink's construction; the others relied on being capped elsewhere.
- F3: SLS kept (and logged at ERROR) every distinct ``errorCode`` an answer carried, whole, until a
  request was stored: a peer answering a code differing per request grew both without bound.

Against the project's receivers (the test Loki's ``charset_next``, the test SLS's ``fail_next``)."""

from __future__ import annotations

import codecs
import encodings
import encodings.aliases
import logging
import math
import pkgutil
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest
from body_helpers import loki_sink, recent

from eventrouter import Outcome, OutcomeKind, RetryableError, SinkContext
from eventrouter.body_prefix import answer_text
from eventrouter.config import ConfigError, build_spec
from eventrouter.plugins import discover
from eventrouter.testing import make_occurrence
from eventrouter.testing.receivers.loki import LokiReceiver
from eventrouter.testing.receivers.sls import AccessKey, SLSReceiver
from eventrouter_sinks.loki import LokiOptions, LokiSink
from eventrouter_sinks.sls import SLSOptions, SLSSink

LOG = logging.getLogger("test.bodies.s35")
NOT_TEXT = ["base64", "rot13", "hex", "undefined", "idna"]
"""Charsets Python's codecs know that no text can be decoded in (with ``errors="replace"``)."""


# -- F1: an answer's charset that is no text encoding ------------------------------------------------


def all_ok(outcomes: Sequence[Outcome] | None) -> bool:
    return outcomes is None or {o.kind for o in outcomes} == {OutcomeKind.OK}


@pytest.mark.parametrize("charset", NOT_TEXT)
async def test_loki_a_final_400_labelled_with_no_text_charset_is_rejected_with_its_text(charset: str) -> None:
    """Before: LookupError/UnicodeError out of send, a "sink bug" retried for ever."""
    async with LokiReceiver() as loki, loki_sink(loki.url) as sink:
        loki.fail_next(400, message="entry too long")
        loki.charset_next(1, charset)
        outcomes = await sink.send(recent(1))
    assert outcomes is not None
    [outcome] = outcomes
    assert outcome.kind is OutcomeKind.REJECT
    assert outcome.reason == "loki: 400 (push of 1 entries refused, possibly partly stored): entry too long"


@pytest.mark.parametrize("charset", NOT_TEXT)
async def test_loki_retry_after_is_honoured_when_the_charset_is_no_text_encoding(charset: str) -> None:
    async with LokiReceiver() as loki, loki_sink(loki.url) as sink:
        loki.fail_next(429, retry_after=120)
        loki.charset_next(1, charset)
        with pytest.raises(RetryableError) as failed:
            await sink.send(recent(1))
    assert failed.value.retry_after == 120
    assert "Ingestion rate limit exceeded" in failed.value.reason


@pytest.mark.parametrize("charset", NOT_TEXT)
async def test_loki_a_413_labelled_with_no_text_charset_is_halved(charset: str) -> None:
    async with LokiReceiver() as loki, loki_sink(loki.url) as sink:
        loki.fail_next(413, message="request entity too large")
        loki.charset_next(1, charset)
        outcomes = await sink.send(recent(4))
    assert all_ok(outcomes)
    assert [push.status for push in loki.pushes] == [413, 204, 204]
    assert len(loki.entries) == 4


@pytest.mark.parametrize("charset", NOT_TEXT)
async def test_loki_a_stored_push_answered_200_labelled_with_no_text_charset_is_delivered_once(
    charset: str,
) -> None:
    """A 200 with a body (a front's, after Loki stored the push) labelled so: before, LookupError/
    UnicodeError out of send, and the stored push pushed again as a sink bug."""
    async with LokiReceiver() as loki, loki_sink(loki.url) as sink:
        loki.fail_next(200, message="ok", store=True)
        loki.charset_next(1, charset)
        assert all_ok(await sink.send(recent(1)))
    assert [push.status for push in loki.pushes] == [200]
    assert len(loki.entries) == 1


@pytest.mark.parametrize("charset", NOT_TEXT)
async def test_loki_start_and_check_pass_when_their_answers_are_labelled_with_no_text_charset(
    charset: str,
) -> None:
    """``/ready``'s 200 and the check's probe push labelled so: before, start raised LookupError/
    UnicodeError (no SinkError naming Loki) and left its session unclosed."""
    async with LokiReceiver() as loki:
        loki.charset_next(1, charset, ready=True)
        loki.charset_next(1, charset)
        sink = LokiSink(
            LokiOptions.model_validate({"url": loki.url, "timeout": 3}),
            SinkContext("loki", "c1", None, LOG, 30.0),
        )
        try:
            await sink.check()
            assert all_ok(await sink.send(recent(1)))
        finally:
            await sink.aclose()
    assert [push.status for push in loki.pushes] == [204, 204]  # the probe, then the push


def every_codec_name() -> list[str]:
    """Every name Python's codecs answer to (aliases and modules of ``encodings``)."""
    names = {*encodings.aliases.aliases, *encodings.aliases.aliases.values()}
    names |= {module.name for module in pkgutil.iter_modules(encodings.__path__)}
    known = []
    for name in sorted(names):
        try:
            codecs.lookup(name)
        except LookupError:
            continue
        known.append(name)
    return known


def test_an_answers_text_never_raises_whatever_its_charset() -> None:
    """The shared decode (body_prefix): every codec Python knows, and names it does not; a text
    encoding is honoured, any other read as UTF-8."""
    body = "entry too far behind é".encode()
    for charset in [*every_codec_name(), None, "", "no-such", "utf-8\x00", "x" * 10_000]:
        assert isinstance(answer_text(body + b"\xff", charset), str), charset
    assert answer_text(body, "latin-1") == body.decode("latin-1")
    assert answer_text(body, "base64") == "entry too far behind é"


# -- F2: no float option takes infinity ----------------------------------------------------------------


def config_error(**entry: Any) -> str:
    """The configuration error (exit 2) for a sink entry, as `eventrouter run` prints it."""
    with pytest.raises(ConfigError) as info:
        build_spec(entry, where="sink", plugins=discover())
    return str(info.value)


DINGTALK = {"type": "dingtalk", "url": "http://127.0.0.1:9/robot/send", "access_token": "t"}
WECOM = {"type": "wecom", "url": "http://127.0.0.1:9/cgi-bin/webhook/send", "key": "k"}
SLS = {
    "type": "sls",
    "url": "http://127.0.0.1:9",
    "project": "p",
    "logStore": "s",
    "accessKeyId": "id",
    "accessKeySecret": "secret",
}
FLOATS = [
    *[
        (DINGTALK, option)
        for option in ("request_timeout", "min_interval", "max_send_wait", "throttle_backoff")
    ],
    *[(WECOM, option) for option in ("request_timeout", "min_interval", "max_send_wait", "throttle_backoff")],
    (SLS, "request_timeout"),
    ({"type": "elasticsearch", "url": "http://127.0.0.1:9200"}, "timeout"),
    ({"type": "kafka", "url": "127.0.0.1:9092", "topic": "t"}, "future_grace"),
]


@pytest.mark.parametrize("value", ["inf", "1e309", math.inf], ids=["inf", "1e309", "float"])
@pytest.mark.parametrize(
    ("entry", "option"), FLOATS, ids=[f"{entry['type']}-{option}" for entry, option in FLOATS]
)
def test_a_float_option_that_is_not_finite_is_a_configuration_error(
    entry: dict[str, Any], option: str, value: object
) -> None:
    """Before, each passed: a robot's request_timeout=inf then raised OverflowError out of every send
    (a WeCom application's start said "cannot reach"), Kafka's future_grace=inf out of the sink's
    construction; the webhook's and Loki's were refused already (items 277, 278)."""
    build_spec({**entry, option: 5}, where="sink", plugins=discover())  # the entry is otherwise valid
    message = config_error(**entry, **{option: value})
    assert f"option '{option}'" in message
    assert "finite" in message


# -- F3: SLS's remembered error codes are bounded ---------------------------------------------------------

PROJECT, LOGSTORE = "k8s-log-c1", "k8s-event"
KEY_ID, KEY_SECRET = "LTAI-bodies-id", "bodies-s3cr3t-9f8e"


@asynccontextmanager
async def sls_sink() -> AsyncIterator[tuple[SLSReceiver, SLSSink]]:
    async with SLSReceiver(projects={PROJECT: [LOGSTORE]}, keys=[AccessKey(KEY_ID, KEY_SECRET)]) as sls:
        opts = {
            "url": sls.url,
            "project": PROJECT,
            "logStore": LOGSTORE,
            "accessKeyId": KEY_ID,
            "accessKeySecret": KEY_SECRET,
            "request_timeout": 2,
        }
        sink = SLSSink(SLSOptions.model_validate(opts), SinkContext("sls", "c1", None, LOG))
        await sink.start()
        try:
            yield sls, sink
        finally:
            await sink.aclose()


async def refused(sink: SLSSink) -> str:
    """The reason of a send of one log refused (retried or rejected)."""
    try:
        outcomes = await sink.send([make_occurrence(cluster="c1", object_name="pod")])
    except RetryableError as exc:
        return exc.reason
    assert outcomes is not None and outcomes[0].kind is not OutcomeKind.OK
    return outcomes[0].reason


def logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name.startswith(LOG.name) and r.levelno >= logging.WARNING
    ]


@pytest.mark.parametrize("status", [403, 400])
async def test_sls_codes_differing_per_answer_are_kept_and_logged_bounded(
    status: int, caplog: pytest.LogCaptureFixture
) -> None:
    """60 answers each with its own 30,000-character code (a request id in it) and message: before,
    60 codes kept whole (1.8 MB) and 60 ERROR lines quoting them whole, until a request was stored."""
    caplog.set_level(logging.INFO, logger=LOG.name)
    async with sls_sink() as (sls, sink):
        for i in range(60):
            sls.fail_next(1, f"Err{i:04d}" + "x" * 30_000, status, "m" * 30_000)
            reason = await refused(sink)
            assert len(reason) < 2_000, len(reason)
        assert len(sink._refused) <= 17
        assert max(map(len, sink._refused)) <= 65
        lines = logged(caplog)
        assert len(lines) <= 17
        assert max(map(len, lines)) < 3_000
        assert "counted together as 'other codes'" in lines[-1]
        caplog.clear()
        sls.fail_next(1, "SignatureNotMatch", 403)  # SLS's own code: still logged once, past the bound
        await refused(sink)
        assert [line for line in logged(caplog) if "credentials refused (SignatureNotMatch)" in line]
