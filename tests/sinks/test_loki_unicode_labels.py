"""Label values Loki cannot parse: Loki reads every pushed stream's labels with Prometheus' PromQL
lexer (pkg/loghttp/push/push.go ``syntax.ParseLabels``), which refuses a literal U+FFFD in a quoted
string (promql/parser/lex.go ``lexString``: ``case utf8.RuneError``) and with it the whole push, 400
"couldn't parse labels". Go writes invalid UTF-8 as U+FFFD, so a reason or kind can carry one."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

import aiohttp
import cramjam
import orjson
import pytest

from eventrouter import Occurrence, OutcomeKind, SinkContext
from eventrouter.protowire import bytes_field, varint_field
from eventrouter.testing import make_occurrence
from eventrouter.testing.receivers.loki import LokiReceiver
from eventrouter_sinks.loki import LokiOptions, LokiSink

CONTEXT = SinkContext(name="loki", cluster="test", data_dir=None, logger=logging.getLogger("test.loki"))
PUSH = "/loki/api/v1/push"
NS = 1_000_000_000


def _at(seconds_ago: float, **kwargs: Any) -> Occurrence:
    when = datetime.fromtimestamp(time.time() - seconds_ago, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return make_occurrence(first_timestamp=when, **kwargs)


def _proto(labels: str, ts_ns: int, line: str) -> bytes:
    seconds, nanos = divmod(ts_ns, NS)
    entry = bytes_field(1, varint_field(1, seconds) + varint_field(2, nanos)) + bytes_field(2, line)
    return bytes(cramjam.snappy.compress_raw(bytes_field(1, bytes_field(1, labels) + bytes_field(2, entry))))


async def test_the_receiver_refuses_a_literal_replacement_character_in_a_label_as_loki_does() -> None:
    """The whole push, both formats, nothing stored; the escape ``\\ufffd`` is taken (``lexEscape``
    refuses only surrogates and values over MaxRune), an escaped surrogate is not."""
    now = time.time_ns()
    proto = {"Content-Type": "application/x-protobuf"}
    answers: list[tuple[int, str]] = []
    async with LokiReceiver() as loki, aiohttp.ClientSession() as http:
        for body, headers in (
            (_proto('{a="ok", reason="Back\ufffdOff"}', now, "literal"), proto),
            (_proto("{a=`raw \ufffd`}", now, "raw"), proto),
            (_proto('{a="bad \\ud800 escape"}', now, "surrogate"), proto),
            (
                orjson.dumps(
                    {
                        "streams": [
                            {"stream": {"a": "ok"}, "values": [[str(now), "first stream"]]},
                            {"stream": {"reason": "Back\ufffdOff"}, "values": [[str(now), "json"]]},
                        ]
                    }
                ),
                {"Content-Type": "application/json"},
            ),
        ):
            async with http.post(loki.url + PUSH, data=body, headers=headers) as response:
                answers.append((response.status, (await response.text()).strip()))
        assert loki.entries == []
        async with http.post(
            loki.url + PUSH, data=_proto('{reason="Back\\ufffdOff"}', now, "escaped"), headers=proto
        ) as response:
            assert response.status == 204
        assert [e.label_dict for e in loki.entries] == [{"reason": "Back\ufffdOff"}]
    assert [status for status, _ in answers] == [400] * 4
    assert all(text.startswith("couldn't parse labels: ") for _, text in answers), answers
    assert [text.endswith("parse error: invalid UTF-8 rune") for _, text in answers] == [
        True,
        True,
        False,
        True,
    ]
    assert answers[2][1].endswith("escape sequence is an invalid Unicode code point")


@pytest.mark.parametrize("fmt", ["protobuf", "json"])
@pytest.mark.parametrize(
    "broken",
    [{"reason": "Back\ufffdOff"}, {"reason": "Back\udcffOff"}, {"kind": "P\ufffdod"}],
    ids=["reason-fffd", "reason-lone-surrogate", "kind-fffd"],
)
async def test_a_replacement_character_in_a_label_value_never_costs_the_push(
    fmt: str, broken: dict[str, str]
) -> None:
    """Before, the sink wrote U+FFFD raw (and made it of a lone surrogate): its stream, new, went last
    in the batch's push with every known stream, and Loki refused that whole push: all 21 items
    dead-lettered, none stored (again on every replay)."""
    async with LokiReceiver() as loki:
        sink = LokiSink(LokiOptions.model_validate({"url": loki.url, "format": fmt}), CONTEXT)
        try:
            warm = await sink.send([_at(60, namespace=f"ns{i}", object_name=f"w{i}") for i in range(5)])
            assert warm is None or all(o.kind is OutcomeKind.OK for o in warm)
            good = [_at(30 - i, namespace=f"ns{i % 5}", object_name=f"g{i}") for i in range(20)]
            bad = _at(5, namespace="ns0", object_name="bad", **broken)
            outcomes = await sink.send([*good, bad])
        finally:
            await sink.aclose()
    kinds = [OutcomeKind.OK] * 21 if outcomes is None else [o.kind for o in outcomes]
    assert kinds == [OutcomeKind.OK] * 21, outcomes
    stored = {orjson.loads(e.line)["involved_object"]["name"]: e for e in loki.entries}
    assert set(stored) == {f"w{i}" for i in range(5)} | {f"g{i}" for i in range(20)} | {"bad"}
    assert not any("\ufffd" in value for e in loki.entries for _, value in e.labels)
    labels = stored["bad"].label_dict
    assert labels.get("reason", "") + labels.get("kind", "") in ("Back?OffPod", "BackOffP?od")
    # The line keeps what came (a lone surrogate as U+FFFD: it cannot be encoded).
    record = orjson.loads(stored["bad"].line)
    assert "\ufffd" in record["reason"] + record["involved_object"]["kind"]
