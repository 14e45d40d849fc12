"""Prometheus metrics. One registry per router so tests and embedded routers never collide.

Label values are bounded: sink instance names, fixed reason categories, watch event types. Never a
secret, an event name or a free-text message.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = [
    "CHECKPOINT_CONFIGMAP_OPS",
    "CHECKPOINT_SEED_RESULTS",
    "DEAD_LETTER_REASONS",
    "LEADER_TRANSITION_REASONS",
    "LEASE_RENEW_FAILURE_REASONS",
    "SINK_DROP_REASONS",
    "SINK_MODIFIED_REASONS",
    "Metrics",
    "observe_many",
]

# The fixed reasons, exported at 0 from the start: an alert on increase() sees a series' first
# increment only if the series existed before it (one drop would otherwise never fire).
SINK_DROP_REASONS = (
    "queue_full",
    "spool_full",
    "spool_error",
    "spool_unreadable",
    "shutdown",
    "deadletter_rotated",
)
DEAD_LETTER_REASONS = ("rejected", "retries_exhausted")
SINK_MODIFIED_REASONS = ("truncated", "time_adjusted", "other")
SEND_ERROR_KINDS = ("retryable", "timeout", "exception", "contract", "start")
SOURCE_DROP_REASONS = (
    "malformed",
    "malformed_line",
    "unknown_watch_type",
    "count_decreased",
    "series_not_raised",
)
SOURCE_REPAIR_REASONS = ("invalid_unicode",)
WATCH_RESTART_REASONS = ("timeout", "expired", "connection", "error")  # and http_<status>
RELIST_REASONS = ("initial", "expired", "rv_regressed")
DATA_DIR_FILES = ("spool", "checkpoint", "deadletter")
RELOAD_RESULTS = ("applied", "unchanged", "invalid")
CHECKPOINT_CONFIGMAP_OPS = ("read", "write")
CHECKPOINT_SEED_RESULTS = ("seeded", "unchanged", "absent", "failed")
LEADER_TRANSITION_REASONS = ("acquired", "lost", "released", "release_failed")
LEASE_RENEW_FAILURE_REASONS = (
    "conflict",
    "unauthorized",
    "forbidden",
    "throttled",
    "refused",
    "server_error",
    "timeout",
    "connection",
    "other",
)


def observe_many(histogram: Histogram, values: Sequence[float]) -> None:
    """``histogram.observe(v)`` for each value, with one locked update per bucket instead of two per
    value: the delivery-lag histogram sees every delivered occurrence (tens of thousands per second).
    Falls back to per-value observations if prometheus-client's child layout ever changes."""
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for value in values:
            histogram.observe(value)
        return
    counts = [0] * len(bounds)
    for value in values:
        counts[bisect_left(bounds, value)] += 1  # first bound >= value, as observe() picks
    for i, n in enumerate(counts):
        if n:
            buckets[i].inc(n)
    total.inc(sum(values))


_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600, 7200)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # Source side.
        self.watch_events = Counter(
            "eventrouter_watch_events", "Watch and list items received, by type.", ["type"], registry=r
        )
        self.occurrences = Counter(
            "eventrouter_occurrences", "New occurrences handed to the fanout.", registry=r
        )
        self.source_dropped = Counter(
            "eventrouter_source_dropped",
            "Objects the source could not use (malformed), or whose occurrence it did not deliver (a"
            " count lowered by its writer, a series that moved on without a higher count), by reason.",
            ["reason"],
            registry=r,
        )
        self.source_repaired = Counter(
            "eventrouter_source_repaired",
            "Objects whose broken Unicode (invalid UTF-8, lone surrogate escapes) was replaced by"
            " U+FFFD before use, by reason.",
            ["reason"],
            registry=r,
        )
        self.watch_restarts = Counter(
            "eventrouter_watch_restarts", "Watch streams reopened, by reason.", ["reason"], registry=r
        )
        self.relists = Counter(
            "eventrouter_relists", "Full lists performed, by reason.", ["reason"], registry=r
        )
        self.last_progress = Gauge(
            "eventrouter_watch_last_progress_timestamp_seconds",
            "Unix time of the last watch event, bookmark or completed list.",
            registry=r,
        )
        self.tracked_events = Gauge(
            "eventrouter_tracked_events",
            "Live Event objects whose occurrence number is remembered.",
            registry=r,
        )
        # Per sink.
        self.received = Counter(
            "eventrouter_sink_received", "Occurrences offered to the sink pipeline.", ["sink"], registry=r
        )
        self.filtered = Counter(
            "eventrouter_sink_filtered", "Occurrences the sink's filter did not keep.", ["sink"], registry=r
        )
        self.skipped = Counter(
            "eventrouter_sink_skipped",
            "Occurrences not sent (again) because the checkpoint says the sink already accepted them, "
            "or a record of them already waits in the disk spool.",
            ["sink"],
            registry=r,
        )
        self.delivered = Counter(
            "eventrouter_sink_delivered", "Occurrences the sink accepted.", ["sink"], registry=r
        )
        self.modified = Counter(
            "eventrouter_sink_modified",
            "Occurrences a sink delivered changed, by reason (truncated: the message cut to the "
            "destination's limit; time_adjusted: stamped at the router's receipt, not its own time); "
            "the record says so too.",
            ["sink", "reason"],
            registry=r,
        )
        self.dropped = Counter(
            "eventrouter_sink_dropped",
            "Occurrences dropped without delivery, by reason (queue_full, spool_full, spool_error, "
            "spool_unreadable, shutdown; deadletter_rotated: dead letters discarded by a rotation).",
            ["sink", "reason"],
            registry=r,
        )
        self.dead_lettered = Counter(
            "eventrouter_sink_dead_lettered",
            "Occurrences the sink rejected for good, by reason (rejected, retries_exhausted).",
            ["sink", "reason"],
            registry=r,
        )
        self.retries = Counter(
            "eventrouter_sink_retries", "Occurrences scheduled for another attempt.", ["sink"], registry=r
        )
        self.send_errors = Counter(
            "eventrouter_sink_send_errors", "Failed send calls, by kind.", ["sink", "kind"], registry=r
        )
        self.queue_depth = Gauge(
            "eventrouter_sink_queue_depth",
            "Occurrences waiting in memory: the memory queue, the items set aside for a later retry (what"
            " queue_max_events bounds) and those waiting behind a disk spool that cannot be written.",
            ["sink"],
            registry=r,
        )
        self.queue_bytes = Gauge(
            "eventrouter_sink_queue_bytes",
            "Bytes counted for the occurrences in queue_depth (what queue_max_bytes bounds): each its"
            " Event's JSON twice (the raw JSON and the record made of it).",
            ["sink"],
            registry=r,
        )
        self.spool_depth = Gauge(
            "eventrouter_sink_spool_depth", "Occurrences waiting in the disk spool.", ["sink"], registry=r
        )
        self.spilled = Counter(
            "eventrouter_sink_spilled",
            "Occurrences written to the disk spool because the memory queue was full.",
            ["sink"],
            registry=r,
        )
        self.send_latency = Histogram(
            "eventrouter_sink_send_duration_seconds",
            "Duration of one send call.",
            ["sink"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "eventrouter_sink_batch_size",
            "Occurrences per send call.",
            ["sink"],
            buckets=(1, 5, 10, 50, 100, 250, 500, 1000, 5000),
            registry=r,
        )
        self.delivery_lag = Histogram(
            "eventrouter_sink_delivery_lag_seconds",
            "From receipt by the router to acceptance by the sink.",
            ["sink"],
            buckets=_LAG_BUCKETS,
            registry=r,
        )
        self.event_lag = Histogram(
            "eventrouter_sink_event_lag_seconds",
            "From the event's own time to acceptance by the sink, for the oldest occurrence of each send "
            "(includes relisted old events).",
            ["sink"],
            buckets=_LAG_BUCKETS,
            registry=r,
        )
        self.sink_up = Gauge(
            "eventrouter_sink_up",
            "1 when the sink's last send succeeded, 0 while it fails.",
            ["sink"],
            registry=r,
        )
        self.loop_blocked = Counter(
            "eventrouter_sink_event_loop_blocked_seconds",
            "Seconds the sink's own code held the event loop in steps of 0.5 s or more (a blocking call "
            "in send, start or aclose): the watch, every other sink and /healthz waited meanwhile.",
            ["sink"],
            registry=r,
        )
        self.data_dir_errors = Counter(
            "eventrouter_data_dir_errors",
            "Writes to the data dir that failed (disk full, I/O error), by sink and file (spool, checkpoint, "
            "deadletter). The router goes on; see eventrouter_checkpoint_durable.",
            ["sink", "file"],
            registry=r,
        )
        self.checkpoint_durable = Gauge(
            "eventrouter_checkpoint_durable",
            "0 while the sink's checkpoint cannot be written (to the data dir, or the checkpoint "
            "ConfigMap): a restart then re-delivers what it accepted since; 1 otherwise.",
            ["sink"],
            registry=r,
        )
        self.sink_reloads = Counter(
            "eventrouter_sink_reloads",
            "Checks of a sink's options after a file they name changed (a rotated credential or "
            "certificate), by result: applied (a new instance sends from then on), unchanged (same "
            "values), invalid (cannot be read or validated: the sink keeps the options it had).",
            ["sink", "result"],
            registry=r,
        )
        self.orphaned = Gauge(
            "eventrouter_data_dir_orphaned_occurrences",
            "Occurrences in the data dir's spool of a sink that is not configured (removed or renamed), "
            "counted at start: they are delivered only if a sink of that name is configured again.",
            ["sink"],
            registry=r,
        )
        self.leader = Gauge("eventrouter_leader", "1 while this replica holds the lease.", registry=r)
        self.leader_transitions = Counter(
            "eventrouter_leader_transitions",
            "Changes of this replica's leadership, by reason: acquired (took the lease), lost (could not "
            "renew it within the renew deadline, or another replica holds it: delivery stops, and the "
            "process exits 1), released (gave it up at its stop), release_failed (could not give it up: "
            "a standby waits until it expires).",
            ["reason"],
            registry=r,
        )
        self.lease_renew_failures = Counter(
            "eventrouter_lease_renew_failures",
            "Renewals of the held lease that failed, by reason: conflict (409), unauthorized (401), "
            "forbidden (403), throttled (429), refused (another 4xx), server_error (5xx), timeout, "
            "connection, other. The leader retries until its renew deadline, then stops leading (lost).",
            ["reason"],
            registry=r,
        )
        self.checkpoint_configmap_errors = Counter(
            "eventrouter_checkpoint_configmap_errors",
            "Reads (op=read: at takeover, retried; nothing is delivered until one succeeds) and writes "
            "(op=write; eventrouter_checkpoint_durable is 0 for every sink until one succeeds) of the "
            "checkpoint ConfigMap that failed: RBAC, an admission webhook, the API server down.",
            ["op"],
            registry=r,
        )
        self.checkpoint_seeds = Counter(
            "eventrouter_checkpoint_seeds",
            "With --checkpoint-seed-configmap: reads of the ConfigMap's checkpoint into the data dir's, one "
            "per start, by result: seeded (taken or merged), unchanged (the state this data dir took last: "
            "not decoded), absent (no such ConfigMap: nothing to seed), failed (forbidden, damaged, timed "
            "out, not written: the sinks may get again what the API server holds; tried at the next start).",
            ["result"],
            registry=r,
        )
        self.checkpoint_truncated = Gauge(
            "eventrouter_checkpoint_truncated",
            "Checkpoint entries left out of the last ConfigMap write to stay under 1 MiB (re-delivery risk).",
            registry=r,
        )
        for counter, reasons in (
            (self.source_dropped, SOURCE_DROP_REASONS),
            (self.source_repaired, SOURCE_REPAIR_REASONS),
            (self.watch_restarts, WATCH_RESTART_REASONS),
            (self.relists, RELIST_REASONS),
        ):
            for reason in reasons:
                counter.labels(reason)
        for op in CHECKPOINT_CONFIGMAP_OPS:
            self.checkpoint_configmap_errors.labels(op)
        for result in CHECKPOINT_SEED_RESULTS:
            self.checkpoint_seeds.labels(result)
        for reason in LEADER_TRANSITION_REASONS:
            self.leader_transitions.labels(reason)
        for reason in LEASE_RENEW_FAILURE_REASONS:
            self.lease_renew_failures.labels(reason)

    def sink_children(self, sink: str) -> None:
        """Export a sink's reason-labelled counters at 0 (see SINK_DROP_REASONS)."""
        for reason in SINK_DROP_REASONS:
            self.dropped.labels(sink, reason)
        for reason in DEAD_LETTER_REASONS:
            self.dead_lettered.labels(sink, reason)
        for reason in SINK_MODIFIED_REASONS:
            self.modified.labels(sink, reason)
        for kind in SEND_ERROR_KINDS:
            self.send_errors.labels(sink, kind)
        for file in DATA_DIR_FILES:
            self.data_dir_errors.labels(sink, file)
        for result in RELOAD_RESULTS:
            self.sink_reloads.labels(sink, result)
        self.loop_blocked.labels(sink)
        self.checkpoint_durable.labels(sink).set(1)
