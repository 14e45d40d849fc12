"""SLS sink against the project's SLS-compatible receiver, and the receiver against the official SDK."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aliyun.log import LogClient, LogException, LogItem, PutLogsRequest
from aliyun.log.log_logs_pb2 import LogGroup  # type: ignore[attr-defined]
from pydantic import ValidationError

from eventrouter import Occurrence, OutcomeKind, RetryableError, SinkContext, SinkError, normalise
from eventrouter.metrics import Metrics
from eventrouter.options import COMMON_KEYS
from eventrouter.record import occurrence_number
from eventrouter.testing import event_object, make_occurrence, recorded_watch
from eventrouter.testing.pipelines import dead_letter, pipeline_for
from eventrouter.testing.receivers.sls import AccessKey, SLSReceiver
from eventrouter.testing.waiting import until
from eventrouter_sinks.sls import SLSOptions, SLSSink, endpoint_url

PROJECT = "k8s-log-c1"
LOGSTORE = "k8s-event"
KEY_ID = "LTAI5tTestKeyId"
SECRET = "s3cr3t-Value-9f8e7d"
STS_ID = "STS.NTestTemporaryId"
STS_SECRET = "sts-s3cr3t-1a2b3c"
STS_TOKEN = "CAIS-token-value-xyz"
WRONG_SECRET = "wr0ng-Secret-5c4b3a"
LOGGER = "test.sls.sink"

MakeSink = Callable[..., Awaitable[SLSSink]]


@pytest.fixture
async def receiver() -> AsyncIterator[SLSReceiver]:
    async with SLSReceiver(
        projects={PROJECT: [LOGSTORE]},
        keys=[AccessKey(KEY_ID, SECRET), AccessKey(STS_ID, STS_SECRET, STS_TOKEN)],
    ) as r:
        yield r


@pytest.fixture
async def make_sink(receiver: SLSReceiver) -> AsyncIterator[MakeSink]:
    sinks: list[SLSSink] = []

    async def make(start: bool = True, **overrides: Any) -> SLSSink:
        values: dict[str, Any] = {
            "url": receiver.url,
            "project": PROJECT,
            "logStore": LOGSTORE,
            "accessKeyId": KEY_ID,
            "accessKeySecret": SECRET,
            "topic": "k8s-events",
        }
        values.update(overrides)
        options = SLSOptions.model_validate(values)
        context = SinkContext(name="sls", cluster="c1", data_dir=None, logger=logging.getLogger(LOGGER))
        sink = SLSSink(options, context)
        sinks.append(sink)
        if start:
            await sink.start()
        return sink

    yield make
    for sink in sinks:
        await sink.aclose()


def recorded_occurrences() -> list[Occurrence]:
    """Each ADDED/MODIFIED whose occurrence number rose for its uid, as the source delivers them."""
    seen: dict[str, int] = {}
    out: list[Occurrence] = []
    for item in recorded_watch():
        if item["type"] not in ("ADDED", "MODIFIED"):
            continue
        obj = item["object"]
        uid = obj["metadata"]["uid"]
        number = occurrence_number(obj)
        if number > seen.get(uid, 0):
            seen[uid] = number
            out.append(normalise(obj, cluster="c1"))
    return out


def fresh(**kwargs: Any) -> Occurrence:
    return make_occurrence(cluster="c1", **kwargs)


def tiny(i: int) -> Occurrence:
    """A minimal Event (about 720 bytes as a log), so 4096 of them fit within 3 MB."""
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return normalise(
        {"metadata": {"uid": f"u{i}", "creationTimestamp": now}, "message": f"m{i}"}, cluster="c1"
    )


def kinds(outcomes: Any) -> list[OutcomeKind]:
    return [o.kind for o in outcomes]


# -- round trips ------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", ["lz4", "deflate"])
async def test_round_trip_of_all_recorded_occurrences(
    receiver: SLSReceiver, make_sink: MakeSink, compress: str
) -> None:
    occurrences = recorded_occurrences()
    assert len(occurrences) == 126
    sink = await make_sink(compress=compress)
    outcomes = await sink.send(occurrences)
    assert outcomes is not None and kinds(outcomes) == [OutcomeKind.OK] * len(occurrences)
    assert [g.compress_type for g in receiver.groups] == [compress]
    group = receiver.groups[0]
    assert (group.project, group.logstore, group.topic, group.source) == (
        PROJECT,
        LOGSTORE,
        "k8s-events",
        "c1",
    )
    logs = receiver.logs()
    assert len(logs) == len(occurrences)
    now = time.time()
    for occ, log in zip(occurrences, logs, strict=True):
        fields = log.fields
        assert orjson.loads(fields["eventId"]) == occ.raw
        assert fields["uid"] == occ.uid and fields["occurrence"] == str(occ.number)
        assert fields["time"] == occ.record["time"]
        assert fields["level"] == occ.record["type"]
        assert fields["involved_object_kind"] == occ.record["involved_object"]["kind"]
        seconds, nanos = divmod(occ.time_ns, 1_000_000_000)
        assert log.time_ns == nanos
        if now - 7 * 86400 + 1500 <= seconds <= now + 300:
            assert log.time == seconds and "time_adjusted" not in fields
        else:  # replayed later than SLS accepts: delivered, stamped at the window's edge
            assert fields["time_adjusted"] == "true" and now - 7 * 86400 < log.time <= now
    # The official protobuf definitions read the very same body.
    official = LogGroup.FromString(group.raw_body)
    assert len(official.Logs) == len(occurrences)
    assert official.Topic == "k8s-events" and official.Source == "c1"
    assert {c.Key: c.Value for c in official.Logs[0].Contents} == logs[0].fields


async def test_fields_match_the_k8s_event_center(receiver: SLSReceiver, make_sink: MakeSink) -> None:
    when = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.123456Z")
    message = "容器反复崩溃，正在重启 " + "x" * 20_000
    occ = fresh(
        kind="Pod",
        object_name="web-0",
        count=None,
        series_count=3,
        event_time=when,
        message=message,
        reason="BackOff",
        host="node-7",
    )
    node_event = fresh(kind="Node", object_name="node-7", reason="NodeReady", type="Normal", host="node-7")
    sink = await make_sink()
    assert kinds(await sink.send([occ, node_event, tiny(0)])) == [OutcomeKind.OK] * 3
    pod_log, node_log, tiny_log = receiver.logs()
    assert "first_time" not in tiny_log.fields  # null fields are left out
    fields = pod_log.fields
    assert fields["eventId"] == orjson.dumps(occ.raw).decode()
    assert fields["hostname"] == "node-7"
    assert fields["level"] == "Warning"
    assert fields["pod_name"] == "web-0"
    assert fields["pod_id"] == occ.raw["involvedObject"]["uid"]
    assert fields["message"] == message and len(fields["message"]) > 20_000
    assert fields["reason"] == "BackOff"
    assert fields["count"] == "3" and fields["series"] == "true"
    assert fields["involved_object_name"] == "web-0"
    assert orjson.loads(fields["labels"]) == {}
    assert "time_adjusted" not in fields
    assert pod_log.time == occ.time_ns // 1_000_000_000
    assert pod_log.time_ns == 123_456_000
    assert "pod_id" not in node_log.fields and "pod_name" not in node_log.fields
    assert node_log.fields["level"] == "Normal"


async def test_sts_security_token(receiver: SLSReceiver, make_sink: MakeSink) -> None:
    sink = await make_sink(accessKeyId=STS_ID, accessKeySecret=STS_SECRET, security_token=STS_TOKEN)
    assert kinds(await sink.send([fresh()])) == [OutcomeKind.OK]
    assert receiver.groups[0].access_key_id == STS_ID
    assert receiver.requests[-1].headers["x-acs-security-token"] == STS_TOKEN
    no_token = await make_sink(start=False, accessKeyId=STS_ID, accessKeySecret=STS_SECRET)
    outcomes = await no_token.send([fresh()])
    assert outcomes is not None and outcomes[0].kind is OutcomeKind.RETRY  # until the token is there
    assert "Unauthorized" in outcomes[0].reason


async def test_route_and_project_in_host_header(receiver: SLSReceiver, make_sink: MakeSink) -> None:
    sink = await make_sink()
    await sink.send([fresh()])
    put = receiver.requests[-1]
    assert put.method == "POST" and put.path == f"/logstores/{LOGSTORE}/shards/lb"
    assert put.headers["Host"] == f"{PROJECT}.127.0.0.1"
    assert put.headers["Content-Type"] == "application/x-protobuf"
    assert put.headers["x-log-apiversion"] == "0.6.0"
    assert put.headers["Authorization"].startswith(f"LOG {KEY_ID}:")
    assert receiver.requests[0].method == "GET"  # start() checked the logstore


# -- splitting --------------------------------------------------------------------------------------


async def test_splits_at_4096_logs(receiver: SLSReceiver, make_sink: MakeSink) -> None:
    batch = [tiny(i) for i in range(5000)]
    sink = await make_sink()
    outcomes = await sink.send(batch)
    assert outcomes is not None and kinds(outcomes) == [OutcomeKind.OK] * 5000
    assert [len(g.logs) for g in receiver.groups] == [4096, 904]
    assert [log.fields["message"] for log in receiver.logs()] == [f"m{i}" for i in range(5000)]


async def test_splits_at_3_mb(receiver: SLSReceiver, make_sink: MakeSink) -> None:
    batch = [fresh(message=f"{i:04d}" + "y" * 30_000) for i in range(150)]  # ~9 MB of protobuf
    sink = await make_sink()
    outcomes = await sink.send(batch)
    assert outcomes is not None and kinds(outcomes) == [OutcomeKind.OK] * 150
    assert len(receiver.groups) >= 3
    assert all(len(g.raw_body) <= 3 * 1024 * 1024 for g in receiver.groups)
    assert [log.fields["message"][:4] for log in receiver.logs()] == [f"{i:04d}" for i in range(150)]


async def test_an_event_too_big_for_one_request_is_rejected_alone(
    receiver: SLSReceiver, make_sink: MakeSink
) -> None:
    sink = await make_sink()
    outcomes = await sink.send([fresh(message="a"), fresh(message="z" * 2_000_000), fresh(message="b")])
    assert outcomes is not None
    assert kinds(outcomes) == [OutcomeKind.OK, OutcomeKind.REJECT, OutcomeKind.OK]
    assert "PutLogs request limit" in outcomes[1].reason
    assert [log.fields["message"] for log in receiver.logs()] == ["a", "b"]


async def test_receiver_enforces_the_limits_the_sink_keeps(
    receiver: SLSReceiver, make_sink: MakeSink
) -> None:
    """The sink's own bounds raised past the service's: the receiver refuses (PostBodyTooLarge), and
    the sink halves the request until the service takes it, and keeps later requests to that size."""
    sink = await make_sink()
    sink.max_logs = 5000  # the sink's own knob, raised past the service limit
    assert kinds(await sink.send([tiny(i) for i in range(4097)])) == [OutcomeKind.OK] * 4097
    assert kinds(await sink.send([tiny(i) for i in range(4097)])) == [OutcomeKind.OK] * 4097
    large = await make_sink()
    large.max_bytes = 5 * 1024 * 1024
    assert kinds(await large.send([fresh(message="q" * 1_000_000) for _ in range(4)])) == [OutcomeKind.OK] * 4
    refused = [r.error_code for r in receiver.requests if r.status != 200]
    assert refused == ["PostBodyTooLarge"] * 2  # once a sink: the size refused is remembered
    assert len(receiver.logs()) == 2 * 4097 + 4


async def test_a_byte_limit_below_the_sinks_is_met_by_halving_the_request(
    receiver: SLSReceiver, make_sink: MakeSink
) -> None:
    """The documented "3 MB" may be 3,000,000 bytes, and the sink packs up to 3 MiB: every log of a
    refused request was dead-lettered although each fits alone."""
    receiver.max_raw_body = 3_000_000
    sink = await make_sink()
    batch = [fresh(message=f"{i:04d}" + "x" * 1300) for i in range(2300)]  # ~3.1 MB: one request
    assert kinds(await sink.send(batch)) == [OutcomeKind.OK] * 2300
    refused = [r.error_code for r in receiver.requests if r.status != 200]
    assert refused and set(refused) == {"PostBodyTooLarge"}  # each request over 3,000,000 bytes, halved
    assert [log.fields["message"][:4] for log in receiver.logs()] == [f"{i:04d}" for i in range(2300)]


async def test_a_request_refused_with_an_unknown_code_costs_only_its_own_logs(
    receiver: SLSReceiver, make_sink: MakeSink
) -> None:
    """A batch split over three requests whose first is refused with a code the sink does not know:
    the other two were dead-lettered without being sent."""
    sink = await make_sink()
    receiver.fail_next(1, "PostBodyUncompressError", 400)
    outcomes = await sink.send([tiny(i) for i in range(9000)])
    assert outcomes is not None
    assert kinds(outcomes) == [OutcomeKind.REJECT] * 4096 + [OutcomeKind.OK] * (9000 - 4096)
    assert len(receiver.logs()) == 9000 - 4096


async def test_bad_text_costs_one_item(receiver: SLSReceiver, make_sink: MakeSink) -> None:
    sink = await make_sink()
    bad = fresh(message="broken \ud800 surrogate")
    outcomes = await sink.send([fresh(message="ok1"), bad, fresh(message="ok2")])
    assert outcomes is not None
    assert kinds(outcomes) == [OutcomeKind.OK, OutcomeKind.REJECT, OutcomeKind.OK]
    assert bad.key in outcomes[1].reason
    assert [log.fields["message"] for log in receiver.logs()] == ["ok1", "ok2"]


async def test_out_of_window_time_is_dead_lettered_when_clamping_is_off(
    receiver: SLSReceiver, make_sink: MakeSink
) -> None:
    sink = await make_sink(clamp_time=False)
    old = fresh(first_timestamp="2020-01-01T00:00:00Z", last_timestamp="2020-01-01T00:00:00Z")
    outcomes = await sink.send([old, fresh(message="now")])
    assert outcomes is not None and kinds(outcomes) == [OutcomeKind.REJECT, OutcomeKind.OK]
    assert "2020-01-01T00:00:00Z" in outcomes[0].reason
    assert [log.fields["message"] for log in receiver.logs()] == ["now"]


# -- responses --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (403, "WriteQuotaExceed", OutcomeKind.RETRY),
        (403, "ShardWriteQuotaExceed", OutcomeKind.RETRY),
        (500, "InternalServerError", OutcomeKind.RETRY),
        (503, "ServerBusy", OutcomeKind.RETRY),
        (502, "BadGateway", OutcomeKind.RETRY),
        (400, "RequestTimeExpired", OutcomeKind.RETRY),
        (401, "SignatureNotMatch", OutcomeKind.RETRY),
        (401, "Unauthorized", OutcomeKind.RETRY),
        (401, "SecurityTokenExpired", OutcomeKind.RETRY),
        (404, "LogStoreNotExist", OutcomeKind.RETRY),
        (404, "ProjectNotExist", OutcomeKind.RETRY),
        # Not in the reference: a suspended project (overdue, or in the recycle bin), a logstore
        # without a shard. They dead-lettered everything sent until it was put right.
        (403, "ProjectForbidden", OutcomeKind.RETRY),
        (403, "ProjectInRecycleBin", OutcomeKind.RETRY),
        (400, "LogStoreWithoutShard", OutcomeKind.RETRY),
        # Codes the sink does not know, by their status: 401/403/404 refuse the target as a whole,
        # 408 is a timeout (both were dead-lettered); another 4xx is about the request's own logs.
        (403, "SomeFutureRefusal", OutcomeKind.RETRY),
        (404, "SomeFutureNotFound", OutcomeKind.RETRY),
        (408, "SomeFutureTimeout", OutcomeKind.RETRY),
        (400, "SomeFutureInvalid", OutcomeKind.REJECT),
    ],
)
async def test_error_code_outcomes(
    receiver: SLSReceiver, make_sink: MakeSink, status: int, code: str, expected: OutcomeKind
) -> None:
    sink = await make_sink()
    receiver.fail_next(1, code, status, retry_after=7)
    outcomes = await sink.send([fresh(), fresh()])
    assert outcomes is not None and kinds(outcomes) == [expected, expected]
    assert code in outcomes[0].reason and PROJECT in outcomes[0].reason and LOGSTORE in outcomes[0].reason
    if expected is OutcomeKind.RETRY:
        assert outcomes[0].retry_after == 7
    assert kinds(await sink.send([fresh()])) == [OutcomeKind.OK]  # the fault was for one request only


async def test_a_request_the_service_cannot_read_is_halved_down_to_the_log_it_refuses(
    receiver: SLSReceiver, make_sink: MakeSink
) -> None:
    sink = await make_sink()
    receiver.fail_next(1, "PostBodyInvalid", 400)  # the two logs together; each alone is taken
    assert kinds(await sink.send([fresh(), fresh()])) == [OutcomeKind.OK] * 2
    receiver.fail_next(1, "PostBodyInvalid", 400)
    outcomes = await sink.send([fresh()])
    assert outcomes is not None and kinds(outcomes) == [OutcomeKind.REJECT]
    assert "PostBodyInvalid" in outcomes[0].reason


def at(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.mark.parametrize("clamp_time", [True, False])
async def test_a_log_time_the_service_refuses_costs_only_that_log(
    receiver: SLSReceiver, make_sink: MakeSink, clamp_time: bool
) -> None:
    # The service's clock 700 s behind ours (within the 15 min its Date check allows): an event
    # 250 s ahead (a node's clock) is inside the sink's window, outside the service's.
    receiver.clock_offset = -700.0
    sink = await make_sink(clamp_time=clamp_time)
    ahead = fresh(last_timestamp=at(time.time() + 250), message="ahead")
    batch = [fresh(message=f"fresh{i}") for i in range(49)] + [ahead]
    outcomes = await sink.send(batch)
    assert outcomes is not None
    stored = {log.fields["message"]: log for log in receiver.logs()}
    assert kinds(outcomes[:49]) == [OutcomeKind.OK] * 49
    assert {f"fresh{i}" for i in range(49)} <= set(stored)
    if clamp_time:  # stamped at the router's now, which is inside the service's window
        assert outcomes[49].kind is OutcomeKind.OK
        assert stored["ahead"].fields["time_adjusted"] == "true"
        assert stored["ahead"].time <= time.time()
    else:
        assert outcomes[49].kind is OutcomeKind.REJECT and "InvalidTimestamp" in outcomes[49].reason
        assert "ahead" not in stored


async def test_an_old_log_is_stamped_inside_a_service_clock_15_minutes_ahead(
    receiver: SLSReceiver, make_sink: MakeSink
) -> None:
    receiver.clock_offset = 850.0  # the service's clock ahead of ours, within its Date check
    sink = await make_sink()
    old = fresh(last_timestamp=at(time.time() - 7 * 86400 + 1000), message="old")  # relisted, replayed
    outcomes = await sink.send([fresh(message="new"), old])
    assert outcomes is not None and kinds(outcomes) == [OutcomeKind.OK] * 2
    assert [r.status for r in receiver.requests if r.method == "POST"] == [200]
    stored = {log.fields["message"]: log for log in receiver.logs()}
    assert stored["old"].fields["time_adjusted"] == "true"


async def test_a_refused_time_is_halved_down_to_the_log_and_stamped_or_rejected(
    receiver: SLSReceiver, make_sink: MakeSink
) -> None:
    sink = await make_sink()
    receiver.fail_next(1, "InvalidTimestamp", 400)  # the two logs together; each alone is taken
    assert kinds(await sink.send([fresh(), fresh()])) == [OutcomeKind.OK] * 2
    receiver.fail_next(1, "InvalidTimestamp", 400)  # one log: sent again stamped at our now
    assert kinds(await sink.send([fresh(message="restamped")])) == [OutcomeKind.OK]
    assert receiver.logs()[-1].fields["time_adjusted"] == "true"
    strict = await make_sink(clamp_time=False)
    receiver.fail_next(1, "InvalidTimestamp", 400)
    outcomes = await strict.send([fresh()])
    assert outcomes is not None and kinds(outcomes) == [OutcomeKind.REJECT]
    assert "InvalidTimestamp" in outcomes[0].reason and PROJECT in outcomes[0].reason


async def test_later_requests_of_a_split_batch_keep_their_own_outcome(
    receiver: SLSReceiver, make_sink: MakeSink
) -> None:
    sink = await make_sink()
    receiver.fail_next(1, "ShardWriteQuotaExceed", 403, after=1)  # the first PUT passes, the second fails
    outcomes = await sink.send([tiny(i) for i in range(9000)])
    assert outcomes is not None
    assert kinds(outcomes) == [OutcomeKind.OK] * 4096 + [OutcomeKind.RETRY] * (9000 - 4096)
    assert len(receiver.logs()) == 4096


async def test_clock_skew_is_retried_and_explained(
    receiver: SLSReceiver, make_sink: MakeSink, caplog: pytest.LogCaptureFixture
) -> None:
    sink = await make_sink()
    receiver.clock_offset = 3600.0  # the service's clock is an hour ahead of ours
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        outcomes = await sink.send([fresh()])
    assert outcomes is not None and outcomes[0].kind is OutcomeKind.RETRY
    assert "RequestTimeExpired" in outcomes[0].reason
    assert "clock" in caplog.text and "NTP" in caplog.text


async def test_clock_skew_is_logged_once_per_run_of_refusals(
    receiver: SLSReceiver, make_sink: MakeSink, caplog: pytest.LogCaptureFixture
) -> None:
    """The RequestTimeExpired warning was logged at every attempt: with the engine's backoff, every
    30 s or sooner for as long as the clock stayed wrong."""
    caplog.set_level(logging.INFO, logger=LOGGER)

    def warnings() -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.levelno == logging.WARNING and "RequestTimeExpired" in r.getMessage()
        ]

    sink = await make_sink()
    receiver.clock_offset = 3600.0  # the service's clock is an hour ahead of ours
    for _ in range(3):
        assert kinds(await sink.send([fresh()])) == [OutcomeKind.RETRY]  # still retried, each time
    assert len(warnings()) == 1
    assert "NTP" in warnings()[0] and "has been expired while server time is" in warnings()[0]
    receiver.clock_offset = 0.0  # NTP fixed it
    assert kinds(await sink.send([fresh()])) == [OutcomeKind.OK]
    assert (
        "accepts logs again (after RequestTimeExpired); requests refused meanwhile: RequestTimeExpired 3"
        in caplog.text
    )
    receiver.clock_offset = -3600.0  # off again: a new run, logged again
    assert kinds(await sink.send([fresh()])) == [OutcomeKind.RETRY]
    assert len(warnings()) == 2


async def test_codes_the_sink_does_not_know_are_judged_by_status_named_and_logged_once_per_run(
    receiver: SLSReceiver, make_sink: MakeSink, caplog: pytest.LogCaptureFixture
) -> None:
    """Any code not listed in the sink was dead-lettered with every log of its request, and nothing
    said which: a new code refusing the project as a whole (the service adds some: ProjectInRecycleBin
    in 2025) cost a whole outage's events, unexplained. A 401/403/404 now refuses the project or
    logstore (retried); another 4xx the request's logs (dead-lettered); each code logged once per run."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    sink = await make_sink()
    receiver.fail_next(3, "SomeFutureRefusal", 403, "the project refuses writes")
    for _ in range(3):
        outcomes = await sink.send([fresh(), fresh()])
        assert outcomes is not None and kinds(outcomes) == [OutcomeKind.RETRY] * 2
        assert "SomeFutureRefusal" in outcomes[0].reason
    receiver.fail_next(2, "SomeFutureInvalid", 400, "the log group is invalid")
    for _ in range(2):
        outcomes = await sink.send([fresh()])
        assert outcomes is not None and kinds(outcomes) == [OutcomeKind.REJECT]
        assert "SLS 400 SomeFutureInvalid: the log group is invalid" in outcomes[0].reason
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2
    assert errors[0].startswith(
        f"sls sink sls: SLS answered 403 SomeFutureRefusal for project {PROJECT!r}, logstore {LOGSTORE!r}"
    )
    assert "a code this sink does not know (the project refuses writes (request id " in errors[0]
    assert "refuses the project or logstore as a whole, not these logs" in errors[0]
    assert "retried (up to retry_max_attempts, if set)" in errors[0]
    assert errors[1].startswith("sls sink sls: SLS answered 400 SomeFutureInvalid for ")
    assert "taken as a refusal of the request's own logs, which are dead-lettered (1 in this" in errors[1]
    assert kinds(await sink.send([fresh()])) == [OutcomeKind.OK]
    assert (
        "accepts logs again (after SomeFutureInvalid, SomeFutureRefusal); requests refused meanwhile: "
        "SomeFutureInvalid 2, SomeFutureRefusal 3"
    ) in caplog.text


async def test_a_suspended_project_loses_nothing_sent_meanwhile(
    receiver: SLSReceiver, make_sink: MakeSink, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Through the engine: the project is suspended after the sink started (an overdue account, or
    moved to the recycle bin): SLS answers 403 ProjectForbidden, a code the reference does not list,
    which dead-lettered everything sent until it was lifted. Now retried and logged once, naming it,
    and a start against it fails naming it (it logged "could not verify" and started)."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    metrics = Metrics()
    sink = await make_sink(start=False)
    pipeline = pipeline_for(
        "sls", sink, metrics, tmp_path / "dl", retry_initial_backoff=0.02, retry_max_backoff=0.1
    )
    task = asyncio.create_task(pipeline.run())
    dead = [metrics.dead_lettered.labels("sls", why) for why in ("rejected", "retries_exhausted")]

    def refused() -> int:
        return sum(r.error_code == "ProjectForbidden" for r in receiver.requests)

    try:
        first = fresh(message="before")
        pipeline.offer(first)
        await receiver.wait_for_logs(1)
        receiver.forbidden.add(PROJECT)
        meanwhile = [fresh(message=f"meanwhile-{i}") for i in range(30)]
        for occ in meanwhile:
            pipeline.offer(occ)
        await until(lambda: refused() >= 3 or any(c._value.get() for c in dead))
        assert [c._value.get() for c in dead] == [0, 0]
        assert metrics.sink_up.labels("sls")._value.get() == 0
        receiver.forbidden.discard(PROJECT)  # the account is settled
        await receiver.wait_for_logs(1 + len(meanwhile))
        await pipeline.wait_idle(10)
    finally:
        pipeline.close()
        await asyncio.wait_for(task, 10)
        await pipeline.close_sink()
    assert [c._value.get() for c in dead] == [0, 0]
    stored = [(log.fields["uid"], log.fields["message"]) for log in receiver.logs()]
    assert sorted(stored) == sorted((occ.uid, occ.record["message"]) for occ in [first, *meanwhile])
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [
        f"sls sink sls: ProjectForbidden for project {PROJECT!r}, logstore {LOGSTORE!r} at {receiver.url}: "
        f"project {PROJECT!r} is disabled (an overdue account, or the project is in the recycle bin): "
        "settle the account or restore the project; its occurrences are retried (up to "
        "retry_max_attempts, if set) until that is put right"
    ]
    assert "accepts logs again (after ProjectForbidden)" in caplog.text
    receiver.forbidden.add(PROJECT)
    with pytest.raises(SinkError, match=r"ProjectForbidden .*has been forbidden.*settle the account"):
        await make_sink()


def target_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR
        and ("LogStoreNotExist" in r.getMessage() or "ProjectNotExist" in r.getMessage())
    ]


async def test_missing_logstore_and_project_are_retried_naming_them_and_logged_once_per_run(
    receiver: SLSReceiver, make_sink: MakeSink, caplog: pytest.LogCaptureFixture
) -> None:
    """The sink's only target missing (being re-created, deleted by mistake, not created yet): its logs
    go in once it exists, as at start. They were dead-lettered, with every log of the batch behind them."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    sink = await make_sink(start=False, logStore="no-such-store")
    outcomes = await sink.send([tiny(i) for i in range(5000)])  # two requests: the second not sent
    await sink.send([fresh()])
    assert outcomes is not None and kinds(outcomes) == [OutcomeKind.RETRY] * 5000
    assert outcomes[0].retry_after is None  # the engine's backoff applies
    assert "LogStoreNotExist" in outcomes[0].reason and "no-such-store" in outcomes[0].reason
    assert [r.error_code for r in receiver.requests] == ["LogStoreNotExist"] * 2
    assert target_errors(caplog) == [
        f"sls sink sls: LogStoreNotExist for project {PROJECT!r}, logstore 'no-such-store' at "
        f"{receiver.url}: create logstore 'no-such-store' in project {PROJECT!r}, or correct logStore; "
        "its occurrences are retried (up to retry_max_attempts, if set) until it exists"
    ]
    receiver.projects[PROJECT].add("no-such-store")  # the operator creates it
    assert kinds(await sink.send([fresh()])) == [OutcomeKind.OK]
    assert "accepts logs again (after LogStoreNotExist)" in caplog.text
    receiver.projects[PROJECT].discard("no-such-store")  # deleted again: a new run, logged again
    assert kinds(await sink.send([fresh()])) == [OutcomeKind.RETRY]
    assert len(target_errors(caplog)) == 2

    other = await make_sink(start=False, project="no-such-project")
    outcomes = await other.send([fresh()])
    assert outcomes is not None and kinds(outcomes) == [OutcomeKind.RETRY]
    assert "ProjectNotExist" in outcomes[0].reason and "no-such-project" in outcomes[0].reason
    assert "create project 'no-such-project' in this region" in target_errors(caplog)[-1]


async def test_a_logstore_removed_after_start_loses_nothing_sent_meanwhile(
    receiver: SLSReceiver, make_sink: MakeSink, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Through the engine: the logstore goes away after the sink started (re-created, or deleted by
    mistake for a few seconds). Everything sent meanwhile was dead-lettered at the first answer; the
    start waited for the same LogStoreNotExist. Now retried with the engine's backoff until it is back."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    metrics = Metrics()
    sink = await make_sink(start=False)
    pipeline = pipeline_for(
        "sls", sink, metrics, tmp_path / "dl", retry_initial_backoff=0.02, retry_max_backoff=0.1
    )
    task = asyncio.create_task(pipeline.run())
    dead = [metrics.dead_lettered.labels("sls", why) for why in ("rejected", "retries_exhausted")]

    def refused() -> int:
        return sum(r.error_code == "LogStoreNotExist" for r in receiver.requests)

    try:
        first = fresh(message="before")
        pipeline.offer(first)
        await receiver.wait_for_logs(1)  # started (GetLogStore found it) and delivering
        receiver.projects[PROJECT].discard(LOGSTORE)
        meanwhile = [fresh(message=f"meanwhile-{i}") for i in range(30)]
        for occ in meanwhile:
            pipeline.offer(occ)
        # Several attempts refused (or, before, the first refusal dead-lettered them).
        await until(lambda: refused() >= 3 or any(c._value.get() for c in dead))
        assert [c._value.get() for c in dead] == [0, 0]
        assert metrics.sink_up.labels("sls")._value.get() == 0
        receiver.projects[PROJECT].add(LOGSTORE)  # re-created
        await receiver.wait_for_logs(1 + len(meanwhile))
        await pipeline.wait_idle(10)
    finally:
        pipeline.close()
        await asyncio.wait_for(task, 10)
        await pipeline.close_sink()
    assert [c._value.get() for c in dead] == [0, 0]
    assert not (tmp_path / "dl").exists() or not (tmp_path / "dl").read_bytes()
    stored = [(log.fields["uid"], log.fields["message"]) for log in receiver.logs()]
    assert sorted(stored) == sorted((occ.uid, occ.record["message"]) for occ in [first, *meanwhile])
    assert metrics.delivered.labels("sls")._value.get() == 1 + len(meanwhile)
    assert metrics.sink_up.labels("sls")._value.get() == 1
    assert len(target_errors(caplog)) == 1  # once for the run of failures
    assert "accepts logs again (after LogStoreNotExist)" in caplog.text


async def test_a_missing_logstore_is_dead_lettered_after_retry_max_attempts(
    receiver: SLSReceiver, tmp_path: Path
) -> None:
    options = SLSOptions.model_validate(
        {
            "url": receiver.url,
            "project": PROJECT,
            "logStore": "no-such-store",
            "accessKeyId": KEY_ID,
            "accessKeySecret": SECRET,
            "check_on_start": False,
        }
    )
    context = SinkContext(name="sls", cluster="c1", data_dir=None, logger=logging.getLogger(LOGGER))
    (record,) = await dead_letter(
        "sls", SLSSink(options, context), tmp_path / "dl", [(fresh(), "retries_exhausted")]
    )
    assert record["reason"].startswith("retries exhausted after 1 attempts: SLS 404 LogStoreNotExist: ")


async def test_wrong_secret_is_retried_and_never_logged(
    receiver: SLSReceiver, make_sink: MakeSink, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    sink = await make_sink(start=False, accessKeySecret=WRONG_SECRET)
    outcomes = await sink.send([fresh(), fresh()])
    await sink.send([fresh()])
    assert outcomes is not None and kinds(outcomes) == [OutcomeKind.RETRY] * 2
    assert "SignatureNotMatch" in outcomes[0].reason and PROJECT in outcomes[0].reason
    assert receiver.requests[-1].status == 401
    errors = [
        r for r in caplog.records if r.levelno >= logging.ERROR and "SignatureNotMatch" in r.getMessage()
    ]
    assert len(errors) == 1 and "accessKeySecret" in errors[0].getMessage()
    with pytest.raises(SinkError) as failure:
        await sink.start()
    message = str(failure.value)
    assert "SignatureNotMatch" in message and PROJECT in message and LOGSTORE in message
    texts = [caplog.text, message, repr(sink.options), str(sink.options), *(o.reason for o in outcomes)]
    for text in texts:
        assert WRONG_SECRET not in text and SECRET not in text


async def test_an_answer_quoting_our_credentials_leaves_them_out_of_reasons_and_logs(
    receiver: SLSReceiver, make_sink: MakeSink, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A gateway in front of SLS answers with a text page quoting the request it refused (its
    x-acs-security-token), and an errorMessage may name a credential: both went into reasons (logged,
    written to the dead-letter file) and start-up messages as they came."""
    caplog.set_level(logging.DEBUG)
    sts = {"accessKeyId": STS_ID, "accessKeySecret": STS_SECRET, "securityToken": STS_TOKEN}
    named = f"denied for secret {STS_SECRET} and token {STS_TOKEN}"
    receiver.fail_next(1, "Unauthorized", 401, echo=True)  # GetLogStore at start: a warning, goes on
    sink = await make_sink(**sts)
    receiver.fail_next(1, "Unauthorized", 401, named)  # the service's JSON: retried
    receiver.fail_next(1, "Forbidden", 403, echo=True)  # the gateway's page: retried too
    outcomes = [o for batch in ([fresh()], [fresh()]) for o in await sink.send(batch) or []]
    assert kinds(outcomes) == [OutcomeKind.RETRY, OutcomeKind.RETRY]
    direct = [o.reason for o in outcomes]
    # Through the engine: the same, each given up after its one attempt.
    receiver.fail_next(1, "Unauthorized", 401, echo=True)
    receiver.fail_next(1, "Unauthorized", 401, named)
    receiver.fail_next(1, "Forbidden", 403, echo=True)
    options = SLSOptions.model_validate(
        {"url": receiver.url, "project": PROJECT, "logStore": LOGSTORE, **sts}
    )
    context = SinkContext(name="sls", cluster="c1", data_dir=None, logger=logging.getLogger(LOGGER))
    records = await dead_letter(
        "sls",
        SLSSink(options, context),
        tmp_path / "dl",
        [(fresh(object_name="a"), "retries_exhausted"), (fresh(object_name="b"), "retries_exhausted")],
    )
    assert [r.status for r in receiver.requests] == [401, 401, 403] * 2
    assert direct[0].startswith("SLS 401 Unauthorized: denied for secret **** and token **** (request id ")
    # The AccessKeyId names the key: no secret, left as it is.
    assert direct[1].startswith(f"SLS 403 HTTP403: refused POST /logstores/{LOGSTORE}/shards/lb with ")
    assert f"Authorization: LOG {STS_ID}:" in direct[1] and "x-acs-security-token: ****" in direct[1]
    reasons = [r["reason"] for r in records]
    assert reasons[0].startswith(
        "retries exhausted after 1 attempts: SLS 401 Unauthorized: denied for secret **** and token **** "
    )
    assert reasons[1].startswith("retries exhausted after 1 attempts: SLS 403 HTTP403: refused POST")
    assert "token: ****" in reasons[1]
    assert "could not verify" in caplog.text and "x-acs-security-token: ****" in caplog.text
    for text in [*direct, *reasons, caplog.text]:
        assert "****" in text
        assert STS_SECRET not in text and STS_TOKEN not in text, text


@pytest.mark.parametrize("status", [401, 403, 404])
async def test_a_proxys_page_refusing_the_whole_target_is_retried_not_dead_lettered(
    receiver: SLSReceiver, make_sink: MakeSink, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A gateway in front of SLS answers 401/403 (its own credentials or policy) or 404 (a path
    prefix) with a page of its own, no SLS error JSON: it refuses every request alike. Before, the
    logs were rejected, dead-lettered, every request's until someone noticed; now they are retried,
    as for SLS's own 401/403/404, and the log says it came with no SLS error code."""
    sink = await make_sink()
    caplog.set_level(logging.WARNING)
    receiver.fail_next(2, "Denied", status, echo=True)
    for _ in range(2):
        outcomes = await sink.send([fresh(), fresh()])
        assert outcomes is not None and kinds(outcomes) == [OutcomeKind.RETRY] * 2
        assert f"SLS {status} HTTP{status}" in outcomes[0].reason
    said = [r.getMessage() for r in caplog.records if "no SLS error code (a proxy?)" in r.getMessage()]
    assert len(said) == 1 and "are retried" in said[0]  # once per run
    assert kinds(await sink.send([fresh()])) == [OutcomeKind.OK]


async def test_start_fails_clearly_for_a_missing_logstore(make_sink: MakeSink) -> None:
    with pytest.raises(SinkError, match=r"LogStoreNotExist.*'missing-store'"):
        await make_sink(logStore="missing-store")


async def test_unreachable_endpoint(make_sink: MakeSink) -> None:
    with pytest.raises(SinkError, match="cannot reach"):
        await make_sink(url="http://127.0.0.1:9")
    sink = await make_sink(start=False, url="http://127.0.0.1:9")
    with pytest.raises(RetryableError, match="cannot reach"):
        await sink.send([fresh()])


async def _cli_check(flag: str) -> tuple[int | None, str]:
    """`eventrouter check <flag>`: (exit code, what it printed and logged)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "eventrouter.cli", "check", flag,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode()


async def test_check_gets_the_logstore_even_with_check_on_start_false(
    receiver: SLSReceiver, make_sink: MakeSink
) -> None:
    # check_on_start=false spares the router's start the request...
    await make_sink(check_on_start=False)
    assert receiver.requests == []

    # ...but `eventrouter check` always asks SLS: it said ok for any of these without a request.
    def flag(url: str = receiver.url, store: str = LOGSTORE, secret: str = SECRET) -> str:
        return (
            f"--sink=sls:{url}?project={PROJECT}&logStore={store}&accessKeyId={KEY_ID}"
            f"&accessKeySecret={secret}&check_on_start=false"
        )

    code, out = await _cli_check(flag())
    assert (code, out.splitlines()[-1]) == (0, f"ok    sls (sls {receiver.url})"), out
    assert [(r.method, r.status) for r in receiver.requests] == [("GET", 200)]
    code, out = await _cli_check(flag(store="missing-store"))
    assert code == 1 and "FAIL" in out and "LogStoreNotExist" in out and "'missing-store'" in out, out
    code, out = await _cli_check(flag(secret=WRONG_SECRET))
    assert code == 1 and "credentials rejected (SignatureNotMatch)" in out, out
    assert WRONG_SECRET not in out
    port = receiver.port
    await receiver.__aexit__(None, None, None)  # SLS goes away
    code, out = await _cli_check(flag(url=f"http://127.0.0.1:{port}"))
    assert code == 1 and "FAIL" in out and "cannot reach" in out, out


# -- options ----------------------------------------------------------------------------------------


def test_kube_eventer_options_and_endpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLS_TEST_SECRET", SECRET)
    base = {
        "project": "p",
        "logStore": "k8s-event",
        "accessKeyId": KEY_ID,
        "accessKeySecret": "env:SLS_TEST_SECRET",
    }
    opts = SLSOptions.model_validate({**base, "url": "https://cn-hangzhou.log.aliyuncs.com", "topic": "t"})
    assert opts.logstore == "k8s-event" and opts.access_key_secret is not None
    assert opts.access_key_secret.get_secret_value() == SECRET and SECRET not in repr(opts)
    assert endpoint_url(opts) == "https://cn-hangzhou.log.aliyuncs.com"
    internal = SLSOptions.model_validate(
        {**base, "url": "https://cn-hangzhou.log.aliyuncs.com", "internal": "true"}
    )
    assert endpoint_url(internal) == "https://cn-hangzhou-intranet.log.aliyuncs.com"
    by_region = SLSOptions.model_validate({**base, "regionId": "cn-beijing"})
    assert endpoint_url(by_region) == "https://cn-beijing.log.aliyuncs.com"
    ke_style = SLSOptions.model_validate(
        {**base, "url": "https://sls.aliyuncs.com", "regionId": "cn-shanghai"}
    )
    assert endpoint_url(ke_style) == "https://cn-shanghai.log.aliyuncs.com"
    with pytest.raises(ValidationError, match="regionId"):
        SLSOptions.model_validate(base)
    with pytest.raises(ValidationError, match="logStore is required"):
        SLSOptions.model_validate({"project": "p", "regionId": "cn-beijing"})
    with pytest.raises(ValidationError, match="compress"):
        SLSOptions.model_validate({**base, "regionId": "cn-beijing", "compress": "gzip"})
    own_keys = {name for name in SLSOptions.model_fields} | {
        "logStore",
        "accessKeyId",
        "accessKeySecret",
        "regionId",
    }
    assert not (own_keys - {"url", "include_raw"}) & COMMON_KEYS


async def test_credentials_from_kube_eventer_environment(
    receiver: SLSReceiver, make_sink: MakeSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AccessKeyId", KEY_ID)
    monkeypatch.setenv("AccessKeySecret", SECRET)
    sink = await make_sink(accessKeyId=None, accessKeySecret=None)
    assert kinds(await sink.send([fresh()])) == [OutcomeKind.OK]
    monkeypatch.delenv("AccessKeySecret")
    with pytest.raises(SinkError, match="accessKeySecret are required"):
        await make_sink(accessKeyId=None, accessKeySecret=None)


# -- the receiver against the official SDK ----------------------------------------------------------


def _sdk_put(key_id: str, secret: str, logs: list[LogItem], token: str | None = None, **kw: Any) -> str:
    # The SDK dials <project>.<endpoint>; HTTP_PROXY (set by the test) carries it to the receiver, the way
    # a forward proxy would, without touching the SDK. source= avoids its DNS probe of the endpoint.
    client = LogClient("sls-test.invalid", key_id, secret, securityToken=token, source="sdk-host")
    try:
        request = PutLogsRequest(PROJECT, kw.pop("logstore", LOGSTORE), "sdk-topic", "", logs, **kw)
        return str(client.put_logs(request).get_request_id())
    finally:
        client._session.close()  # type: ignore[attr-defined]  # the SDK has no close(); don't leak the socket


def _sdk_get_logstore(name: str) -> Any:
    client = LogClient("sls-test.invalid", KEY_ID, SECRET, source="sdk-host")
    try:
        return client.get_logstore(PROJECT, name)
    finally:
        client._session.close()  # type: ignore[attr-defined]  # the SDK has no close(); don't leak the socket


async def test_receiver_accepts_the_official_sdk_and_checks_its_signature(
    receiver: SLSReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, receiver.url)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    now = int(time.time())
    items = [LogItem(now, [("k", "v"), ("中文", "日志")], 5), LogItem(now, [("n", "2")], 6)]

    request_id = await asyncio.to_thread(_sdk_put, KEY_ID, SECRET, items)  # LZ4, the SDK's default
    await asyncio.to_thread(_sdk_put, KEY_ID, SECRET, items, compress=False)
    await asyncio.to_thread(_sdk_put, STS_ID, STS_SECRET, items, token=STS_TOKEN)
    assert request_id
    assert [(g.compress_type, g.topic, g.source) for g in receiver.groups] == [
        ("lz4", "sdk-topic", "sdk-host"),
        ("", "sdk-topic", "sdk-host"),
        ("lz4", "sdk-topic", "sdk-host"),
    ]
    first = receiver.groups[0].logs
    assert [(log.time, log.time_ns, log.fields) for log in first] == [
        (now, 5, {"k": "v", "中文": "日志"}),
        (now, 6, {"n": "2"}),
    ]
    assert receiver.requests[0].headers["Host"] == f"{PROJECT}.sls-test.invalid"

    with pytest.raises(LogException) as wrong:
        await asyncio.to_thread(_sdk_put, KEY_ID, WRONG_SECRET, items)
    assert (wrong.value.get_error_code(), wrong.value.get_resp_status()) == ("SignatureNotMatch", 401)
    with pytest.raises(LogException) as no_token:
        await asyncio.to_thread(_sdk_put, STS_ID, STS_SECRET, items)
    assert no_token.value.get_error_code() == "Unauthorized"
    with pytest.raises(LogException) as old:
        await asyncio.to_thread(_sdk_put, KEY_ID, SECRET, [LogItem(now - 8 * 86400, [("k", "v")])])
    assert old.value.get_error_code() == "InvalidTimestamp"
    with pytest.raises(LogException) as missing:
        await asyncio.to_thread(_sdk_put, KEY_ID, SECRET, items, logstore="nope")
    assert (missing.value.get_error_code(), missing.value.get_resp_status()) == ("LogStoreNotExist", 404)

    assert (await asyncio.to_thread(_sdk_get_logstore, LOGSTORE)).logstore_name == LOGSTORE
    with pytest.raises(LogException, match="LogStoreNotExist"):
        await asyncio.to_thread(_sdk_get_logstore, "nope")
    assert len(receiver.groups) == 3


async def test_receiver_refuses_tampered_and_malformed_bodies(
    receiver: SLSReceiver, make_sink: MakeSink
) -> None:
    sink = await make_sink()
    signed = sink._signed_headers  # build correctly signed requests around bad bodies
    resource = f"/logstores/{LOGSTORE}/shards/lb"

    async def post(body: bytes, headers: dict[str, str], send: bytes | None = None) -> tuple[int, Any, Any]:
        all_headers = signed("POST", resource, body, {"Content-Type": "application/x-protobuf", **headers})
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                receiver.url + resource, data=send if send is not None else body, headers=all_headers
            ) as r,
        ):
            return r.status, await r.json(content_type=None), r.headers.get("x-log-requestid")

    not_protobuf = b"\x0a\xff\xff\xff"  # a length running past the end
    status, error, request_id = await post(not_protobuf, {"x-log-bodyrawsize": str(len(not_protobuf))})
    assert (status, error["errorCode"]) == (400, "PostBodyInvalid") and request_id
    no_time = b"\x0a\x02\x12\x00"  # Log without the required Time
    status, error, _ = await post(no_time, {"x-log-bodyrawsize": "4"})
    assert (status, error["errorCode"]) == (400, "PostBodyInvalid")
    good = b"\x0a\x05\x08" + bytes([0x80, 0x80, 0x80, 0x01])
    status, error, _ = await post(good, {"x-log-bodyrawsize": "99", "x-log-compresstype": "lz4"})
    assert (status, error["errorCode"]) == (400, "PostBodyUncompressError")
    status, error, _ = await post(good, {"x-log-bodyrawsize": str(len(good))}, send=good[:-1] + b"\x02")
    assert (status, error["errorCode"]) == (400, "InvalidContentMD5")
    assert receiver.groups == []


async def test_event_object_factory_is_unchanged_by_the_sink(make_sink: MakeSink) -> None:
    obj = event_object(message="same")
    occ = normalise(obj, cluster="c1")
    before = orjson.dumps(occ.record)
    sink = await make_sink()
    await sink.send([occ])
    assert orjson.dumps(occ.record) == before


async def test_receiver_default_project_for_a_bare_ip_host(make_sink: MakeSink) -> None:
    keys = [AccessKey(KEY_ID, SECRET)]
    async with (
        SLSReceiver(projects={PROJECT: [LOGSTORE]}, keys=keys) as strict,
        SLSReceiver(projects={PROJECT: [LOGSTORE]}, keys=keys, default_project=PROJECT) as lenient,
    ):
        sink = await make_sink(start=False)
        sink._credentials()
        resource = f"/logstores/{LOGSTORE}"
        statuses = []
        for receiver in (strict, lenient):
            headers = sink._signed_headers("GET", resource, b"", {"x-log-bodyrawsize": "0"})
            headers["Host"] = f"127.0.0.1:{receiver.port}"  # no project label in Host
            async with (
                aiohttp.ClientSession() as session,
                session.get(receiver.url + resource, headers=headers) as r,
            ):
                statuses.append((r.status, (await r.json(content_type=None)).get("errorCode")))
    assert statuses == [(404, "ProjectNotExist"), (200, None)]
