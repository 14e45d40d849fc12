"""Answers read in part (session 33, item 263): something before SLS or Loki (a proxy's error page, a
misrouted ingress serving a file) may answer with a body of any size. The SLS sink read it whole
(``resp.read()``), on every retry, though it quotes 200 bytes of it: one 256 MB 502 page took the
process from 53 to 580 MB, past the chart's 256Mi limit. Loki's ``response.text()`` did the same, on
push and on start's ``/ready``.

Against the project's receivers answering with a streamed 64 MiB page (``fail_next(page=...)``):
the page is never read whole (the client goes away after a bounded prefix; ``FrontPage.written`` is
what the server could hand over before that, kernel buffers included), the request is judged as
before (retried, or rejected), and the next request goes through."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest

from eventrouter import Occurrence, OutcomeKind, RetryableError, SinkContext
from eventrouter.testing import make_occurrence
from eventrouter.testing.receivers.front_page import FrontPage
from eventrouter.testing.receivers.loki import LokiReceiver
from eventrouter.testing.receivers.sls import AccessKey, SLSReceiver
from eventrouter.testing.waiting import until
from eventrouter_sinks.loki import LokiOptions, LokiSink
from eventrouter_sinks.sls import SLSOptions, SLSSink

PAGE = 64 << 20
"""Bytes of the front's page: far more than the kernel buffers of a loopback connection hold."""
PROJECT = "k8s-log-c1"
LOGSTORE = "k8s-event"
KEY_ID = "LTAI5tTestKeyId"
SECRET = "s3cr3t-Value-9f8e7d"
LOGGER = "test.answer_bounds"


def _context(name: str) -> SinkContext:
    return SinkContext(name=name, cluster="c1", data_dir=None, logger=logging.getLogger(LOGGER))


def _recent(name: str) -> Occurrence:
    when = datetime.fromtimestamp(time.time() - 30, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return make_occurrence(cluster="c1", object_name=name, first_timestamp=when)


async def _not_read_whole(pages: list[FrontPage]) -> FrontPage:
    """The one page answered, once its answer ended: the client went away before taking it all."""
    await until(lambda: len(pages) == 1 and pages[0].done)
    page = pages[0]
    assert page.size == PAGE
    assert page.written < page.size, "the page was read whole"
    return page


# --------------------------------------------------------------------------------------------- SLS


@pytest.fixture
async def sls() -> AsyncIterator[SLSReceiver]:
    async with SLSReceiver(projects={PROJECT: [LOGSTORE]}, keys=[AccessKey(KEY_ID, SECRET)]) as receiver:
        yield receiver


async def _sls_sink(receiver: SLSReceiver) -> SLSSink:
    options = SLSOptions.model_validate(
        {
            "url": receiver.url,
            "project": PROJECT,
            "logStore": LOGSTORE,
            "accessKeyId": KEY_ID,
            "accessKeySecret": SECRET,
        }
    )
    sink = SLSSink(options, _context("sls"))
    await sink.start()
    return sink


@pytest.mark.parametrize("status", [502, 200])
async def test_sls_reads_a_bounded_prefix_of_a_fronts_page(sls: SLSReceiver, status: int) -> None:
    """A 64 MiB page for PutLogs, as a 502 and as a 200 without ``x-log-requestid`` (a captive
    gateway's): retried, naming it, from a bounded prefix; the next send stores the log. Before, the
    whole page was read (and held with its copies) before its status was judged."""
    sink = await _sls_sink(sls)
    sls.fail_next(1, "", status, page=PAGE)  # after start's GetLogStore
    try:
        first = await sink.send([_recent("api-0")])
        assert first is not None and first[0].kind is OutcomeKind.RETRY
        assert f"{status}" in first[0].reason
        await _not_read_whole(sls.pages)
        again = await sink.send([_recent("api-0")])
        assert again is None or {o.kind for o in again} == {OutcomeKind.OK}
    finally:
        await sink.aclose()
    assert len(sls.logs()) == 1


# -------------------------------------------------------------------------------------------- Loki


def _loki_sink(url: str, **options: Any) -> LokiSink:
    return LokiSink(LokiOptions.model_validate({"url": url, **options}), _context("loki"))


async def test_loki_push_answered_with_a_huge_502_page_is_retried_from_a_prefix() -> None:
    """A 64 MiB 502 page for a push: retried (nothing stored), read in part; the next push stores."""
    async with LokiReceiver() as loki:
        loki.fail_next(502, page=PAGE)
        sink = _loki_sink(loki.url)
        try:
            with pytest.raises(RetryableError) as caught:
                await sink.send([_recent("api-0")])
            assert "502" in caught.value.reason
            await _not_read_whole(loki.pages)
            again = await sink.send([_recent("api-0")])
            assert again is None or {o.kind for o in again} == {OutcomeKind.OK}
        finally:
            await sink.aclose()
        assert len(loki.entries) == 1


async def test_loki_push_answered_with_a_huge_400_page_is_judged_from_a_prefix() -> None:
    """A 400 is read further than other answers (Loki's may name a stream many times): still a
    bounded prefix. A front's 400 page names no stream: the push is rejected whole, not split."""
    async with LokiReceiver() as loki:
        loki.fail_next(400, page=PAGE)
        sink = _loki_sink(loki.url)
        try:
            outcomes = await sink.send([_recent("api-0"), _recent("api-1")])
        finally:
            await sink.aclose()
        assert outcomes is not None and {o.kind for o in outcomes} == {OutcomeKind.REJECT}
        assert all("400" in o.reason for o in outcomes)
        await _not_read_whole(loki.pages)
        assert len(loki.pushes) == 1  # not pushed again in halves


async def test_loki_start_reads_a_bounded_prefix_of_a_huge_ready_page(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``/ready`` answered with a 64 MiB 502 page: the start warns and goes on, reading it in part."""
    async with LokiReceiver() as loki:
        loki.ready_page = PAGE
        sink = _loki_sink(loki.url)
        try:
            with caplog.at_level(logging.WARNING):
                await sink.start()
            await _not_read_whole(loki.pages)
        finally:
            await sink.aclose()
    assert any("answered 502" in r.getMessage() for r in caplog.records)
