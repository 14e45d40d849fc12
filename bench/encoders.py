"""Micro-benchmark: each sink's encoder, per event, on fresh occurrences from the corpus.

    python -m bench.encoders [--events 20000]

How each is timed (no network: the encoders are called directly, the same functions ``send`` calls):

* stdout:  ``StdoutSink._encode(occ)`` (record JSON + newline), then the batch ``b"".join``
* file:    ``occ.encode() + b"\\n"`` per occurrence, as ``FileSink.send`` does, then the join
* webhook: ``WebhookSink._encode(occ)`` per occurrence and the batch body ``b"[" + b",".join(...) + b"]"``
* loki:    ``LokiSink._entry(i, occ)`` (labels, line, structured metadata) per occurrence and
           ``LokiSink.encode(entries)`` (protobuf + snappy) per batch of 500, divided per event
* kafka:   ``KafkaSink.encode(occ)`` (topic, key, headers, value) plus aiokafka's
           ``DefaultRecordBatchBuilder.estimate_size_in_bytes`` as ``send`` does; the producer's own
           per-record cost (``producer.send``) is not an encoder and shows in the throughput profile
* elasticsearch: ``ElasticsearchSink._encode(occ)`` (bulk action + document line) and the join
* sls:     ``SLSSink._encode(occ, now)`` (LogGroup protobuf) per occurrence, ``_chunks`` and lz4 per batch

Two numbers per sink: **cold** — fresh occurrences whose shared record JSON (``occ.json``) is not yet
encoded, so the first sink pays for it (the cost when it is the only sink); **warm** — ``occ.json``
already cached (the cost of each further sink). The shared record build (``normalise``) is reported
separately; it is paid once per occurrence in the source, not by a sink.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from bench import _common as c
from bench.corpus import CACHE, ensure_corpus

BATCH = 500


def _occurrences(path: Path, n: int) -> list[Any]:
    from eventrouter.source.tracker import OccurrenceTracker

    tracker = OccurrenceTracker(cluster="bench")
    out = []
    with path.open("rb") as f:
        for line in f:
            ev = orjson.loads(line)
            if ev["type"] == "DELETED":
                continue
            occ = tracker.observe(ev["object"])
            if occ is not None:
                out.append(occ)
                if len(out) >= n:
                    break
    return out


def _sinks() -> dict[str, Any]:
    from eventrouter.config import build_specs
    from eventrouter.sink import SinkContext

    flags = {
        "stdout": "stdout:",
        "file": "file:/tmp/bench-encoders-unused.jsonl",
        "webhook": "webhook:http://127.0.0.1:9/hook",
        "loki": "loki:http://127.0.0.1:9",
        "kafka": "kafka:127.0.0.1:9?topic=k8s-events&idempotence=false",
        "elasticsearch": "elasticsearch:http://127.0.0.1:9?index=k8s-events-{yyyy.MM.dd}",
        "sls": "sls:http://127.0.0.1:9?project=p&logstore=l&access_key_id=a&access_key_secret=b",
    }
    sinks = {}
    for name, flag in flags.items():
        (spec,) = build_specs([flag])
        ctx = SinkContext(name=name, cluster="bench", data_dir=None, logger=logging.getLogger("bench"))
        sinks[name] = spec.sink_cls(spec.options, ctx)
    return sinks


def _batches(items: Sequence[Any]) -> list[Sequence[Any]]:
    return [items[i : i + BATCH] for i in range(0, len(items), BATCH)]


def _encoders(sinks: dict[str, Any]) -> dict[str, Callable[[Sequence[Any]], object]]:
    from aiokafka.record.default_records import DefaultRecordBatchBuilder

    stdout, webhook, loki = sinks["stdout"], sinks["webhook"], sinks["loki"]
    kafka, es, sls = sinks["kafka"], sinks["elasticsearch"], sinks["sls"]
    estimate = DefaultRecordBatchBuilder.estimate_size_in_bytes

    def enc_stdout(batch: Sequence[Any]) -> object:
        return b"".join(stdout._encode(o) for o in batch)

    def enc_file(batch: Sequence[Any]) -> object:
        return b"".join(o.encode(include_raw=False) + b"\n" for o in batch)

    def enc_webhook(batch: Sequence[Any]) -> object:
        return b"[" + b",".join(webhook._encode(o) for o in batch) + b"]"

    def enc_loki(batch: Sequence[Any]) -> object:
        loki.set_window(time.time_ns())  # as send does: each entry's time is checked against it
        return loki.encode([loki._entry(i, o) for i, o in enumerate(batch)])

    def enc_kafka(batch: Sequence[Any]) -> object:
        kafka.set_window(int(time.time() * 1000))  # as send does
        out = []
        for o in batch:
            m = kafka.encode(o)
            out.append(estimate(m.key, m.value, m.headers))
        return out

    def enc_es(batch: Sequence[Any]) -> object:
        return b"".join(es._encode(o) for o in batch)

    def enc_sls(batch: Sequence[Any]) -> object:
        now = time.time()
        logs = [(i, sls._encode(o, now)[0]) for i, o in enumerate(batch)]
        header = sls._group_header()
        return [sls._compress(b"".join(ch.logs) + header) for ch in sls._chunks(logs, len(header))]

    return {
        "stdout": enc_stdout,
        "file": enc_file,
        "webhook": enc_webhook,
        "loki": enc_loki,
        "kafka": enc_kafka,
        "elasticsearch": enc_es,
        "sls": enc_sls,
    }


def _time_us(fn: Callable[[Sequence[Any]], object], occs: list[Any]) -> float:
    gc.collect()
    t0 = time.perf_counter()
    for batch in _batches(occs):
        fn(batch)
    return (time.perf_counter() - t0) / len(occs) * 1e6


def run(events: int, seed: int) -> dict[str, Any]:
    from eventrouter.record import normalise

    c.pin({c.ROUTER_CPU})
    corpus = ensure_corpus(100_000, seed)
    raws = [o.raw for o in _occurrences(corpus, events)]
    gc.collect()
    t0 = time.perf_counter()
    for raw in raws:
        normalise(raw, cluster="bench")
    normalise_us = (time.perf_counter() - t0) / len(raws) * 1e6
    t0 = time.perf_counter()
    occs = [normalise(raw, cluster="bench") for raw in raws]
    for o in occs:
        o.json  # noqa: B018 - the shared record JSON, encoded once per occurrence
    json_us = (time.perf_counter() - t0) / len(raws) * 1e6 - normalise_us
    encoders = _encoders(_sinks())
    rows: dict[str, Any] = {}
    for name, fn in encoders.items():
        fresh = [normalise(raw, cluster="bench") for raw in raws]
        cold = _time_us(fn, fresh)
        warm = _time_us(fn, fresh)  # now occ.json is cached
        rows[name] = {"cold_us": round(cold, 2), "warm_us": round(warm, 2)}
        print(f"{name:14s} cold {cold:6.2f} µs/event   warm {warm:6.2f} µs/event", file=sys.stderr)
    print(
        f"{'(normalise)':14s} {normalise_us:6.2f} µs/event   record JSON (occ.json) {json_us:5.2f} µs/event",
        file=sys.stderr,
    )
    return {
        "machine": c.machine(),
        "events": len(raws),
        "normalise_us": round(normalise_us, 2),
        "record_json_us": round(json_us, 2),
        "encoders": rows,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.encoders", description=__doc__.split("\n")[0])
    p.add_argument("--events", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", type=Path, default=CACHE / "results" / "encoders.json")
    args = p.parse_args(argv)
    c.dump(run(args.events, args.seed), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
