"""Session 36: a front's 5xx/408 after HEC took the request is a lost answer (review-b F1).

A front before HEC (nginx, an ALB, an API gateway) answers 502 when HEC's answer is cut off and 504
when HEC answers later than it waits, though HEC took the request under an ackId the sink never sees.
After a HEC restart that ackId is 0, which a request still waiting holds too: asked about it, HEC would
confirm the other request's events."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal

import aiohttp
import pytest
from aiohttp import web
from eventrouter import OK, Occurrence, OutcomeKind, SinkContext
from eventrouter.testing import make_occurrence
from eventrouter.testing.receivers.unreadable import Unreadable
from hec_fronts import relay, serve

from eventrouter_splunk_hec import SplunkHECOptions, SplunkHECSink
from eventrouter_splunk_hec.fake import FakeHEC

TOKEN = "11111111-2222-3333-4444-555555555555"
LOG = logging.getLogger("test.splunk_hec.front")
FRONT_WAIT = 1.0
"""Seconds the front waits for HEC's answer (nginx's proxy_read_timeout, shorter than the sink's)."""
SINK_TIMEOUT = 2.0
HOWS: list[Unreadable] = ["stall", "cut", "gzip"]


def nginx_page(status: int, title: str) -> bytes:
    return (
        f"<html>\r\n<head><title>{status} {title}</title></head>\r\n<body>\r\n<center><h1>{status} {title}"
        "</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
    ).encode()


@asynccontextmanager
async def front(hec: FakeHEC, status: int, content_type: str | None, page: bytes) -> AsyncIterator[str]:
    """A front forwarding every request to ``hec`` and its answer back as it came; when HEC's answer is
    cut off or later than ``FRONT_WAIT``, it answers ``status`` with its own ``page``, as nginx does
    (502 "upstream prematurely closed connection", 504 "upstream timed out"). Yields its base URL."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=FRONT_WAIT)) as upstream:

        async def forward(request: web.Request) -> web.Response:
            try:
                return await relay(upstream, hec.url + request.path_qs, request)
            except (aiohttp.ClientError, TimeoutError):
                return web.Response(status=status, body=page, content_type=content_type)

        async with serve(forward) as base:
            yield base


@asynccontextmanager
async def hec_sink(
    url: str, timeout: float = SINK_TIMEOUT, send_timeout: float = 6.0
) -> AsyncIterator[SplunkHECSink]:
    context = SinkContext(
        name="splunk_hec", cluster="test", data_dir=None, logger=LOG, send_timeout=send_timeout
    )
    sink = SplunkHECSink(
        SplunkHECOptions.model_validate({"token": TOKEN, "url": url, "timeout": timeout}), context
    )
    try:
        await sink.start()
        yield sink
    finally:
        await sink.aclose()


Fault = Literal["cut", "late"]
FRONTS: dict[str, tuple[Fault, int, str | None, bytes]] = {
    "nginx-502": ("cut", 502, "text/html", nginx_page(502, "Bad Gateway")),
    "nginx-504": ("late", 504, "text/html", nginx_page(504, "Gateway Time-out")),
    "envoy-503": (
        "cut",
        503,
        "text/plain",
        b"upstream connect error or disconnect/reset before headers. reset reason: connection termination",
    ),
    "api-gateway-json-502": ("cut", 502, "application/json", b'{"message": "Internal server error"}'),
    "json-with-a-code-500": ("cut", 500, "application/json", b'{"code": 500, "message": "upstream failed"}'),
    "empty-502": ("cut", 502, None, b""),
    "408": ("late", 408, "text/html", nginx_page(408, "Request Time-out")),
}


def fail_one(hec: FakeHEC, fault: Fault, n: int = 1) -> None:
    """HEC takes the next ``n`` requests (stored, numbered) and the front never passes its answer on."""
    if fault == "cut":
        hec.lose_answers(n)
    else:
        hec.late_next(n, FRONT_WAIT * 2.5)


@pytest.mark.parametrize("name", list(FRONTS))
async def test_a_fronts_5xx_after_a_hec_restart_never_confirms_a_waiting_request_by_another(
    name: str,
) -> None:
    """R0 waits under ackId 0; HEC restarts (R0 lost, the channel numbered from 0 again) and takes R1
    under ackId 0, but the front answers a status of its own. Before, a 5xx was retried on the same
    channel: R1 sent again got ackId 1 (above the last: no renumbering seen), and asked about ackId 0,
    HEC confirmed R1's first copy: R0 answered OK, indexed 0 times. Now a 5xx/408 that is not HEC's own
    answer is a lost answer: R0 is posted again (indexed once) on a new channel."""
    fault, status, content_type, page = FRONTS[name]
    r0, r1 = make_occurrence(reason="R0"), make_occurrence(reason="R1")
    async with (
        FakeHEC(tokens={TOKEN}, ack_tokens={TOKEN}, hold_acks=True) as hec,
        front(hec, status, content_type, page) as url,
        hec_sink(url) as sink,
    ):
        held = await sink.send([r0])
        assert held is not None and held[0].held, held
        hec.restart()
        hec.hold_acks = False
        fail_one(hec, fault)
        refused = await sink.send([r1])
        assert refused is not None and refused[0].kind is OutcomeKind.RETRY, refused
        assert refused[0].reason.startswith(f"HEC {status}"), refused[0].reason
        assert [e["event"]["reason"] for e in hec.events] == ["R1"] and hec.lost[0]["event"]["reason"] == "R0"
        again = await sink.send([r0, r1])
        assert again is not None
        indexed = [e["event"]["reason"] for e in hec.events]
        for occ, outcome in zip((r0, r1), again, strict=True):
            assert outcome is not OK or occ.record["reason"] in indexed, (outcome, indexed)
        assert all(o is OK for o in again), again
    assert indexed == ["R1", "R0", "R1"]  # R1 twice: the front hid that HEC took it
    # R0, voided, went again on a channel of its own (item 325), new requests on the sink's new one.
    assert len(hec.channels) == 3 and hec.channels[-1] == sink.channel


HEC_OWN = {
    "busy-503-code-9": (503, {"text": "Server is busy", "code": 9}),
    "internal-500-code-8": (500, {"text": "Internal server error", "code": 8}),
}


@pytest.mark.parametrize("name", list(HEC_OWN))
async def test_hecs_own_5xx_through_the_front_keeps_the_channel_and_the_waiting_request(name: str) -> None:
    """A guard (item 298): HEC's own 5xx answer, passed on by the front, is given before HEC takes
    anything: the channel is kept and R0, waiting under ackId 0, is not posted again (indexed once)."""
    status, body = HEC_OWN[name]
    r0, r1 = make_occurrence(reason="R0"), make_occurrence(reason="R1")
    async with (
        FakeHEC(tokens={TOKEN}, ack_tokens={TOKEN}, hold_acks=True) as hec,
        front(hec, 502, "text/html", nginx_page(502, "Bad Gateway")) as url,
        hec_sink(url) as sink,
    ):
        held = await sink.send([r0])
        assert held is not None and held[0].held, held
        channel = sink.channel
        hec.fail_next(1, status, body)
        busy = await sink.send([r1])
        assert busy is not None and busy[0].kind is OutcomeKind.RETRY
        assert f"(code {body['code']})" in busy[0].reason, busy[0].reason
        assert sink.channel == channel
        hec.hold_acks = False
        hec.release_acks()
        again = await sink.send([r0, r1])
    assert again is not None and all(o is OK for o in again), again
    assert [e["event"]["reason"] for e in hec.events] == ["R0", "R1"]  # each once
    assert hec.channels == [channel]


async def test_a_front_answering_502_to_request_after_request_costs_each_event_one_copy_at_most() -> None:
    """The copies stay bounded: R0 waits under ackId 0, HEC restarts, and the front answers 502 to four
    requests in a row that HEC took (R1..R4). Only the first moves the channel (R0 was waiting on it);
    nothing waits on the new one, so the others cost nothing more. Then everything is delivered: R0
    once (it was lost in the restart), each of R1..R4 twice (the front hid that HEC took them), on three
    channels (R0 on one of its own since item 325). Before, R0 was answered OK and never indexed."""
    r0, later = make_occurrence(reason="R0"), [make_occurrence(reason=f"R{i}") for i in range(1, 5)]
    async with (
        FakeHEC(tokens={TOKEN}, ack_tokens={TOKEN}, hold_acks=True) as hec,
        front(hec, 502, "text/html", nginx_page(502, "Bad Gateway")) as url,
        hec_sink(url) as sink,
    ):
        held = await sink.send([r0])
        assert held is not None and held[0].held, held
        hec.restart()
        hec.hold_acks = False
        hec.lose_answers(len(later))
        channels: list[str] = []
        for occ in later:
            refused = await sink.send([occ])
            assert refused is not None and refused[0].reason.startswith("HEC 502: <html>"), refused
            channels.append(sink.channel)
        assert len(set(channels)) == 1  # moved once, at the first 502
        again = await sink.send([r0, *later])
        assert again is not None
        indexed = Counter(e["event"]["reason"] for e in hec.events)
        for occ, outcome in zip((r0, *later), again, strict=True):
            assert outcome is not OK or indexed[occ.record["reason"]] > 0, (outcome, indexed)
        assert all(o is OK for o in again), again
    assert indexed == {"R0": 1, "R1": 2, "R2": 2, "R3": 2, "R4": 2}, indexed
    assert len(hec.channels) == 3 and sink.channel in hec.channels  # and R0's own (item 325)


@pytest.mark.parametrize("how", HOWS)
async def test_a_5xx_whose_body_cannot_be_read_keeps_its_retry_after_and_is_a_lost_answer(
    how: Unreadable,
) -> None:
    """A 503 whose body cannot be read (stalled, cut off, labelled gzip and not) may be HEC's busy
    answer garbled, or a front's after HEC took the request: which, the sink cannot tell, and the
    second, taken for the first, loses a waiting request silently. So it is a lost answer: R0, waiting
    under ackId 0, is posted again on a new channel (indexed twice at most, never OK unindexed), and
    the Retry-After is kept. Before (item 298), the channel was kept."""
    r0, r1 = make_occurrence(reason="R0"), make_occurrence(reason="R1")
    async with (
        FakeHEC(tokens={TOKEN}, ack_tokens={TOKEN}, hold_acks=True) as hec,
        hec_sink(hec.url) as sink,
    ):
        held = await sink.send([r0])
        assert held is not None and held[0].held, held
        channel = sink.channel
        hec.fail_next(1, 503, retry_after="120", unreadable=how)
        busy = await sink.send([r1])
        assert busy is not None and busy[0].kind is OutcomeKind.RETRY and busy[0].retry_after == 120
        assert busy[0].reason.startswith("HEC 503 (its body unreadable: "), busy[0].reason
        assert sink.channel != channel
        hec.hold_acks = False
        hec.release_acks()
        again = await sink.send([r0, r1])
        assert again is not None and all(o is OK for o in again), again
    assert Counter(e["event"]["reason"] for e in hec.events) == {"R0": 2, "R1": 1}
    # R0 went again on a channel of its own (item 325), R1 on the sink's new one.
    assert len(hec.channels) == 3 and hec.channels[0] == channel and hec.channels[-1] == sink.channel


async def alternate(rounds: int, *, restart: bool) -> Counter[str]:
    """R0 waits under ackId 0 while HEC is slow to index (acks held). Then, ``rounds`` times, HEC takes a
    request X<k> and the front answers 502, and the engine offers again all that waits (R0 and the X
    before). ``restart``: then HEC restarts (all it holds unindexed lost), and a new event Y is sent,
    whose ackId shows the renumbering. Then HEC indexes, and all is offered until OK. Every OK is
    checked indexed. The copies HEC received of each request (indexed and lost in the restart)."""
    r0, xs = make_occurrence(reason="R0"), [make_occurrence(reason=f"X{k}") for k in range(rounds)]
    async with (
        FakeHEC(tokens={TOKEN}, ack_tokens={TOKEN}, hold_acks=True) as hec,
        front(hec, 502, "text/html", nginx_page(502, "Bad Gateway")) as url,
        hec_sink(url, timeout=0.5, send_timeout=1.2) as sink,
    ):

        async def offer(batch: list[Occurrence]) -> list[Occurrence]:
            """Send ``batch``: what is not OK, and every OK indexed."""
            outcomes = await sink.send(batch)
            assert outcomes is not None
            indexed = {e["event"]["reason"] for e in hec.events}  # a restart moves what it loses to hec.lost
            for occ, outcome in zip(batch, outcomes, strict=True):
                assert outcome is not OK or occ.record["reason"] in indexed, (occ.record["reason"], indexed)
            return [occ for occ, outcome in zip(batch, outcomes, strict=True) if outcome is not OK]

        assert await offer([r0]) == [r0]
        for k, x in enumerate(xs):
            hec.lose_answers(1)
            outcomes = await sink.send([x])  # HEC takes it, the front answers 502
            assert outcomes is not None and outcomes[0].reason.startswith("HEC 502: <html>"), outcomes
            await offer([r0, *xs[: k + 1]])
        left = [r0, *xs]
        if restart:
            hec.restart()
        hec.hold_acks = False
        hec.release_acks()
        if restart:
            assert await offer([make_occurrence(reason="Y")]) == []
        for _ in range(3):  # a voided request is posted again when offered again, and confirmed
            left = await offer(left)
            if not left:
                break
        assert not left, left
    copies = Counter(e["event"]["reason"] for e in hec.events + hec.lost)
    return copies


async def test_a_request_voided_by_a_lost_answer_is_not_voided_again_by_later_ones() -> None:
    """r318 F4: a front answering 502 to every other request (HEC took each) while R0 waits. Each 502
    voided the request waiting under ackId 0 on the channel; posted again, R0 was the first on the new
    channel, ackId 0 again, and the next 502 voided it again: R0 indexed 2, 6 and 21 times after 1, 5
    and 20 such 502s. Now a voided request is posted again on a channel of its own, which nothing
    else is posted on until HEC confirms it: R0 twice at most; each X twice for its own lost answer,
    and once more at most (posted again first on the sink's new channel, voided once by the next
    502). Never OK unindexed."""
    for rounds in (1, 5, 20):
        copies = await alternate(rounds, restart=False)
        assert copies["R0"] <= 2, (rounds, copies)
        assert all(copies[f"X{k}"] <= 3 for k in range(rounds)), (rounds, copies)
        assert set(copies) == {"R0", *(f"X{k}" for k in range(rounds))}


async def test_a_hec_restart_with_requests_waiting_on_their_own_channels_costs_each_one_copy() -> None:
    """The same 20 rounds, then HEC restarts while everything waits (R0 on its own channel, the X
    voided on theirs, the last on the sink's), losing all it had not indexed. A new event Y's ackId on
    the sink's channel shows the renumbering: all that waits is posted again, and HEC numbers each
    own channel anew too. Voiding everything waiting at each such renumbering voided the requests
    just posted again on the other channels after the restart (R0 4 copies, X0..X17 5 each); only
    what HEC answered on other channels before the channel's last ackId is voided now. Never OK
    unindexed, each request one copy more than without the restart at most."""
    copies = await alternate(20, restart=True)
    assert copies["R0"] <= 3 and copies["Y"] == 1, copies
    assert all(copies[f"X{k}"] <= 4 for k in range(20)), copies
