"""The router: builds one pipeline per sink, runs the source into the fanout, serves health and
metrics, and shuts down gracefully (stop the watch, drain within a deadline, persist state)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import math
import os
import re
import shutil
import socket
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from eventrouter.config import SinkSpec
from eventrouter.datalock import DataDirInUse, DataDirLock
from eventrouter.engine.checkpoint import (
    CheckpointBackend,
    CheckpointTable,
    FileCheckpoint,
    MemoryCheckpoint,
    SinkCheckpoint,
    put_folder_in_place,
    safe_name,
    sync_folder,
)
from eventrouter.engine.configmap_checkpoint import (
    CheckpointFormatError,
    ConfigMapCheckpoint,
    ConfigMapCheckpointStore,
    configmap_version,
    unreadable,
)
from eventrouter.engine.configmap_checkpoint import _off_loop as in_checkpoint_thread
from eventrouter.engine.deadletter import DEADLETTER_MAX, DeadLetter
from eventrouter.engine.filter import compile_filter
from eventrouter.engine.pipeline import INTAKE_ROOM, Pipeline, queue_cost
from eventrouter.engine.reload import SETTLE, SinkReloader, watched_state
from eventrouter.engine.spool import Spool
from eventrouter.fanout import Fanout, UnseenFile, UnseenStore
from eventrouter.leader import LeaderElector
from eventrouter.memory import clear_caches, release_free_memory
from eventrouter.metrics import Metrics
from eventrouter.record import MalformedEvent, Occurrence
from eventrouter.sink import STRAY_CANCEL, SinkContext, aside_bound, cancelled_now, raised_by_signal
from eventrouter.source.kube import ApiError, KubeClient, connect, failure_text
from eventrouter.source.relist_order import RelistOrder
from eventrouter.source.tracker import OccurrenceTracker
from eventrouter.source.watcher import READ_TIMEOUT_MARGIN, EventWatcher, WatchSettings, shared_relists

__all__ = ["Router", "RouterSettings", "check_stall_timeout"]

log = logging.getLogger("eventrouter")


@dataclass
class RouterSettings:
    cluster_name: str = ""
    """Stamped on every record as ``cluster``."""
    namespaces: list[str] = field(default_factory=list)
    """Namespaces to watch; empty watches the whole cluster."""
    data_dir: Path | None = None
    """Checkpoints, dead letters and spools live here. Without it a restart re-delivers what the API
    server still holds and the spool is off."""
    data_dir_max_bytes: int | None = None
    """The data dir's volume size: each sink's spool and dead-letter files are bounded to share it."""
    kubeconfig: str | None = None
    context: str | None = None
    metrics_addr: str | None = ":8080"
    """host:port for /metrics, /healthz, /readyz (an empty host: every address of both families);
    None disables the HTTP server."""
    shutdown_timeout: float = 25.0
    """Seconds to drain queues on SIGTERM; keep below the pod's terminationGracePeriodSeconds."""
    stall_timeout: float = 600.0
    """/healthz fails when no watch event, bookmark or list completed for this long. At least
    ``watch.watch_timeout`` + 40 s (``check_stall_timeout``), unless ``allow_short_stall_timeout``."""
    allow_short_stall_timeout: bool = False
    """Accept a ``stall_timeout`` shorter than a quiet watch may last: only where quiet watches make
    progress sooner (an API server sending bookmarks often; tests of stall detection against the test
    API server). Without it the Router refuses such settings, as the command line does."""
    watch: WatchSettings = field(default_factory=WatchSettings)
    leader_elect: bool = False
    """Only the holder of the Lease watches and delivers; the others stand by."""
    leader_namespace: str = "default"
    leader_name: str = "eventrouter"
    leader_identity: str = ""
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    checkpoint_configmap: str | None = None
    """Keep checkpoints in this ConfigMap (namespace ``checkpoint_namespace``) instead of --data-dir."""
    checkpoint_namespace: str = "default"
    checkpoint_seed_configmap: str | None = None
    """Take over the checkpoint this ConfigMap (namespace ``checkpoint_namespace``) holds, as
    ``checkpoint_configmap`` writes it, so that the switch from the chart's configMap mode to dataDir
    delivers nothing twice, also onto a claim kept from an earlier dataDir period. Read (a GET) at each
    start: on an empty checkpoint store it becomes the data dir's checkpoint; over one the data dir
    holds, merged (the higher number of each entry: every number in it was accepted by that sink),
    unless it is the state (uid, resourceVersion) the data dir took last (SEED_TAKEN: not decoded then).
    A read that fails (forbidden, damaged, a timeout) is tried again at the next start. Only read,
    never written; not with ``checkpoint_configmap``."""
    checkpoint_flush_interval: float = 1.0
    """Seconds between ConfigMap writes: after a SIGKILL the new leader may re-deliver up to this much."""
    checkpoint_prune_interval: float = 60.0
    """How often checkpoint entries of events the source no longer tracks (deleted) are dropped: a sink
    that lags behind the events' TTL accepts them after their deletion, and no relist prunes them."""
    reload_interval: float = 5.0
    """How often the files named by sink options (``file:`` secrets, certificates, templates) are
    checked; a changed one rebuilds its sink (a rotated credential). 0: read them only at start."""
    memory_trim_interval: float = 60.0
    """How often freed heap is handed back to the OS (besides after each relist): a sink catching up
    from its spool frees memory long after the relist (measured: 155 → 124 MiB RSS at one trim)."""


def check_stall_timeout(
    watch_timeout: int,
    stall_timeout: float,
    names: tuple[str, str] = ("stall_timeout", "watch.watch_timeout"),
) -> None:
    """Refuse a stall timeout shorter than a quiet watch lasts, naming the settings by ``names``
    (the command line's option names, or RouterSettings' fields). A quiet watch sends nothing until
    the API server ends it at its timeout (Events have no bookmarks by default: no watch cache), and
    only its reopening counts as progress: /healthz failed during every quiet watch, and the liveness
    probe restarted the router again and again (``--watch-timeout 1800``)."""
    stall, watch = names
    least = watch_timeout + READ_TIMEOUT_MARGIN  # as long as the client itself waits on a silent watch
    if stall_timeout >= least:
        return
    most = math.floor(stall_timeout) - READ_TIMEOUT_MARGIN if math.isfinite(stall_timeout) else 0
    lower = f" or {watch} to at most {most}" if most >= 1 else ""
    raise ValueError(
        f"{stall} {stall_timeout:g} is too short for {watch} {watch_timeout}: on a quiet "
        "cluster a watch of Events (no bookmarks by default) sends nothing until its timeout ends it, "
        f"and /healthz would fail during every such watch; raise {stall} to at least {least}"
        f" ({watch} + {READ_TIMEOUT_MARGIN}){lower}"
    )


DISK_RESERVE = 0.2
"""Of a data dir's budget, kept for what is not per sink: checkpoints and a relist's sorted file
(~1.5 KiB per retained event: 75 MB for 50,000)."""

STOP_AFTER_DRAIN = 5.0
"""Seconds a stop has after --shutdown-timeout before the kubelet kills the pod: the chart's and
deploy/'s terminationGracePeriodSeconds less shutdownTimeout, the least the chart accepts."""

LEASE_RELEASE_RESERVE = 1.0
"""Of those, what the last ConfigMap write leaves for the lease's release and closing the clients."""

FINAL_WRITE_LEAST = 2.0
"""Seconds the stop's ConfigMap write may take even when the drain used the whole grace period."""

CLOSE_LEAST = 1.0
"""Seconds the sinks' closes may take at a stop even when the grace period is used up."""

STOP_SCAN_SECONDS = 2.0
"""At a stop with a ConfigMap checkpoint, how long the spools (all sinks together) are read to tell
the records of events the API server still holds from the others: ~600 MB at 300 MB/s. What the
stop does after its drain must fit terminationGracePeriodSeconds less --shutdown-timeout (5 s in the
chart); records not read by then are reported as not checked."""


def disk_bounds(specs: Sequence[SinkSpec], budget: int | None) -> dict[str, tuple[int, int]]:
    """Per sink, (spool bytes, bytes per dead-letter file) so that together they fit ``budget``: each
    sink gets an equal share of what the reserve leaves, three quarters for its spool and a quarter
    for its two dead-letter files (the current one and the rotated one). Smaller configured bounds
    stay. Without a budget, the configured bounds."""
    if budget is None or not specs:
        return {spec.name: (spec.pipeline.spool_max_bytes, DEADLETTER_MAX) for spec in specs}
    spool_room, deadletter = _share(len(specs), budget)
    return {spec.name: (min(spec.pipeline.spool_max_bytes, spool_room), deadletter) for spec in specs}


def _share(sinks: int, budget: int) -> tuple[int, int]:
    """Of ``budget``, one sink's room for its spool and for each of its two dead-letter files."""
    share = int(budget * (1 - DISK_RESERVE)) // sinks
    deadletter = min(DEADLETTER_MAX, max(1, share // 8))
    return max(0, share - 2 * deadletter), deadletter


def budget_beside_spools_off(sinks: int, budget: int, held: Mapping[str, int]) -> int:
    """The data dir's budget left when the sinks in ``held`` run without a spool while their spool
    folders still hold that many bytes. Such a sink keeps its share (disk_bounds), whose spool room
    it leaves unused: a folder is taken out of the budget only for what it holds beyond that room.
    Taken out in full, it was counted twice, and a neighbour's spool shrank below what it held and
    dropped its oldest records (item 202's first version). The room depends on the budget left, so
    this is (to a byte) the largest B with B + sum(max(0, held - room(B))) <= budget: each step down
    from ``budget`` takes out at least as much as the one before, and the steps shrink."""
    settled = budget
    for _ in range(1000):  # ~120 at most in a seeded search of 50,000 layouts
        room = _share(sinks, settled)[0]
        lower = max(0, budget - sum(max(0, size - room) for size in held.values()))
        if lower >= settled:
            return settled
        settled = lower
    return max(0, budget - sum(held.values()))  # never reached in practice: every folder in full


SEED_READ_SECONDS = 30.0
"""How long a checkpoint seed's read of its ConfigMap may take, tries again after a 429, a 5xx or a
broken connection included; then the router starts without it (everything again, never a loss)."""


SEED_EMPTY = "starting with an empty checkpoint: each sink gets again what the API server still holds"
SEED_OWN = "starting from the data dir's own checkpoint"
SEED_AGAIN = "the seed is tried again at the next start"
SEED_OWN_AGAIN = (
    "this start sends each sink again what a configMap-mode router delivered since this data dir last "
    "took ConfigMap {where} (if one ran in between: a switch back) and the API server still holds"
)
"""Said with SEED_OWN: what a failed read costs at a switch back (item 304's Left), not only later."""
SEED_IGNORED_SHOWN = 10
"""Sinks of the ConfigMap not configured named in the seed's INFO line at most (the rest counted)."""
_PLAIN_NAME = re.compile(r"[\w.-]+", re.ASCII)

SEED_TAKEN = "checkpoint-seed.taken"
"""In the data dir: the ConfigMap state its checkpoint took last (``<namespace>/<name> uid=…
resourceVersion=…``) or found absent (``<namespace>/<name> absent``), written durably after the seed
or merge it records. Each start reads the ConfigMap (a GET, the checkpoint not decoded yet) and takes
it only when it is another state: a claim kept across dataDir → configMap → dataDir holds the first
period's checkpoint, and the ConfigMap what the configMap mode delivered since. Missing (a data dir
seeded before this record, or never) or unwritable: the next start merges again (the same numbers)."""

SEED_PENDING = "checkpoint-seed.pending"
"""Written by item 299's code while a seed was owed; SEED_TAKEN says it now (every start reads the
ConfigMap): removed with SEED_TAKEN's first write."""


def _check_seed(settings: RouterSettings) -> None:
    """Refuse a checkpoint seed the settings cannot use, naming both settings."""
    if settings.checkpoint_seed_configmap is None:
        return
    if settings.checkpoint_configmap is not None:
        raise ValueError(
            "RouterSettings: checkpoint_seed_configmap and checkpoint_configmap exclude each other: the "
            "seed starts the data dir's checkpoint from a ConfigMap's, checkpoint_configmap keeps it there"
        )
    if settings.data_dir is None:
        raise ValueError("RouterSettings: checkpoint_seed_configmap needs data_dir (the checkpoint it seeds)")


SEED_FOLDER = "checkpoints.seed"
"""The data dir's folder a seed is written in before it becomes ``checkpoints`` in one rename."""


def _drop_unfinished_seed(side: Path) -> None:
    """Remove a seed folder a kill left before its rename (a seed, if asked, is written anew)."""
    if not side.exists():
        return
    try:
        shutil.rmtree(side)
    except OSError as exc:
        log.warning(
            "checkpoint seed: cannot remove %s left by an unfinished seed (%s)", side, exc.strerror or exc
        )
        return
    log.info("checkpoint seed: removed %s, left by a seed that did not finish", side)


def _seed_taken(data: Path) -> str | None:
    """SEED_TAKEN's state; None when there is none that can be read (the ConfigMap is then taken)."""
    try:
        return (data / SEED_TAKEN).read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def _forget_seed(data: Path) -> None:
    """Remove SEED_TAKEN durably: the checkpoint it recorded is gone (the folder emptied by hand, a
    restore without it). Kept, a start whose seed failed left it, and the next start took the same
    ConfigMap state for one its new checkpoint had taken ("unchanged"), never merging it."""
    with contextlib.suppress(FileNotFoundError):
        (data / SEED_TAKEN).unlink()
        sync_folder(data)


def _record_seed(data: Path, state: str) -> None:
    """Write SEED_TAKEN durably, after the checkpoint it records (a kill between: the next start merges
    the same numbers again); item 299's SEED_PENDING goes with it."""
    record = data / SEED_TAKEN
    tmp = record.with_name(record.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(state + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, record)
    with contextlib.suppress(FileNotFoundError):
        (data / SEED_PENDING).unlink()
    sync_folder(data)


def _ignored(held: Iterable[str], configured: Iterable[str]) -> str:
    """The seed's INFO-line part naming the ConfigMap's sinks not configured: the first
    SEED_IGNORED_SHOWN, the rest counted; a name other than letters, digits, ``_ . -`` quoted (it is the
    ConfigMap's text: a line break in it made a log line of its own)."""
    ignored = sorted(set(held) - set(configured))
    if not ignored:
        return ""
    shown = ", ".join(n if _PLAIN_NAME.fullmatch(n) else repr(n) for n in ignored[:SEED_IGNORED_SHOWN])
    more = len(ignored) - SEED_IGNORED_SHOWN
    return f"; not configured, ignored: {shown}" + (f" and {more} more" if more > 0 else "")


def _seed_not_written(where: str, folder: Path | None, why: object, fallback: str) -> None:
    """The WARNING of a seed read but not written (``folder``: where it was to go, if known)."""
    log.warning(
        "checkpoint seed: cannot write the checkpoint read from ConfigMap %s%s (%s); %s",
        where,
        f" to {folder}" if folder is not None else "",
        why,
        fallback,
    )


def _raise_to(backend: FileCheckpoint, seed: Mapping[str, int]) -> int:
    """Raise ``backend``'s entries to ``seed``'s numbers where those are higher (a new snapshot); how
    many were raised or added."""
    own = backend.load()
    raised = 0
    for uid, n in seed.items():
        if n > own.get(uid, 0):
            own[uid] = n
            raised += 1
    if raised:
        backend.compact(own)
    return raised


def _holds_checkpoint(folder: Path) -> bool:
    """Whether the data dir's checkpoint store was ever written: any file in it (a sink's snapshot or
    journal, even empty, the first-unseen times)."""
    try:
        return any(folder.iterdir())
    except FileNotFoundError:
        return False


def _checkpoint_backend(settings: RouterSettings, name: str) -> CheckpointBackend:
    if settings.data_dir is None:
        return MemoryCheckpoint()
    return FileCheckpoint(settings.data_dir / "checkpoints", name)


def _site_port(site: web.BaseSite) -> int:
    sockets = getattr(site._server, "sockets", None) or []
    return int(sockets[0].getsockname()[1])


async def _listen(runner: web.AppRunner, host: str, port: int) -> tuple[int, str]:
    """Serve ``runner`` on ``host`` (an address or name: its family only; ``[v6]`` in brackets), or,
    for an empty host, on every address of both families (one dual-stack socket, so ``:0`` gives one
    port): the kubelet probes the pod IP, which is IPv6 on an IPv6 cluster, and asyncio's ``[::]`` is
    IPv6 only (``IPV6_V6ONLY``). IPv4 alone where the kernel has no IPv6. Returns the port and what it
    listens on, for the log."""
    site: web.BaseSite
    if host.strip("[]"):
        site = web.TCPSite(runner, host.strip("[]"), port)
        await site.start()
        return _site_port(site), f"{host}:{_site_port(site)}"
    if not socket.has_dualstack_ipv6():
        site = web.TCPSite(runner, "0.0.0.0", port)
        await site.start()
        return _site_port(site), f"0.0.0.0:{_site_port(site)} (IPv4 only: this kernel has no IPv6)"
    sock = socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True)
    site = web.SockSite(runner, sock)
    try:
        await site.start()
    except BaseException:
        sock.close()
        raise
    return _site_port(site), f"[::]:{_site_port(site)} (every IPv4 and IPv6 address)"


class Router:
    def __init__(
        self,
        settings: RouterSettings,
        specs: Sequence[SinkSpec],
        *,
        metrics: Metrics | None = None,
        checkpoint_backend: Callable[[str], CheckpointBackend] | None = None,
    ) -> None:
        if not settings.allow_short_stall_timeout:
            # Here, not in RouterSettings: settings are changed after they are built (tests do).
            try:
                check_stall_timeout(settings.watch.watch_timeout, settings.stall_timeout)
            except ValueError as exc:
                raise ValueError(
                    f"RouterSettings: {exc}; allow_short_stall_timeout=True accepts it where quiet "
                    "watches make progress sooner (bookmarks)"
                ) from None
        _check_seed(settings)
        self.settings = settings
        self.specs = list(specs)
        # The files the options were read from, as they are now: a standby builds its sinks when it
        # takes the lease, and a Secret rotated while it stood by must be seen changed then (item 264).
        self._files_read = {spec.name: watched_state(spec) for spec in self.specs}
        self.metrics = metrics or Metrics()
        self._backend_factory = checkpoint_backend or (lambda name: _checkpoint_backend(settings, name))
        self.pipelines: list[Pipeline] = []
        self.reloaders: list[SinkReloader] = []
        self._data_lock: DataDirLock | None = None
        self.fanout = Fanout([])
        self.watchers: list[EventWatcher] = []
        self.kube: KubeClient | None = None
        self._control: KubeClient | None = None  # the lease's and the checkpoint ConfigMap's
        self._tasks: list[asyncio.Task[None]] = []
        self._pipeline_tasks: list[asyncio.Task[None]] = []
        self._listed_namespaces: set[str | None] = set()
        self._keys_shared = False  # checkpoint entries read at start re-keyed on the trackers' uids
        self._http: web.AppRunner | None = None
        self.http_port: int | None = None
        self.draining = False
        self.stopped = asyncio.Event()
        self._stopping = False
        self.elector: LeaderElector | None = None
        self._trim_task: asyncio.Task[None] | None = None
        self.memory_trims = 0
        # Seconds a trim after a burst waits for backlogs that do not come down (a sink that is down).
        self.burst_trim_patience = 60.0
        self.cache_entries_cleared = 0
        self.checkpoint_store: ConfigMapCheckpointStore | None = None
        self.exit_code = 0
        # Wall time this process started leading (took the lease, or started without leader
        # election): until a watch exists, its last progress for /healthz and the stall alert.
        self._leading_since: float | None = None  # time.time(): exported as the last progress
        self._leading_mono = 0.0  # time.monotonic() of the same: what /healthz judges by
        self._replaying = False  # replay(): what a stop leaves is still in its input
        # halt_replay(): a replay stopped by a signal hands nothing more on (review-c F3).
        self._replay_halt = asyncio.Event()
        self._lead_blocked: str | None = None  # why the lead has not got to the watch, for the probes

    @property
    def sinks(self) -> dict[str, Any]:
        """Each pipeline's sink instance by name (a reloaded one once it has taken over)."""
        return {p.name: p.sink for p in self.pipelines}

    # ---- building -----------------------------------------------------------------------------

    def _open_data_dir(self) -> tuple[dict[str, tuple[int, int]], dict[str, Spool]]:
        """The data dir's part of the build: the spools no sink reads reported, each sink's bounds, and
        its spool opened, which reads every record it holds (a full 256 MiB spool: ~2.4 CPU-seconds,
        ~30 s on a 5% share of a CPU). File work only (no event-loop object): start_pipelines runs it
        in a worker thread, so that /healthz and the lease's renewals are answered meanwhile; the
        liveness probe killed a router starting on a full spool, at every restart again."""
        data = self.settings.data_dir
        budget = self.settings.data_dir_max_bytes
        stranded = self._report_orphans(data) if data is not None else 0
        if budget and stranded:
            # Spools of sinks no longer configured take their room on the volume until removed.
            budget = max(0, budget - stranded)
        bounds = disk_bounds(self.specs, budget)
        held: dict[str, int] = {}
        beside = budget
        while data is not None:
            # A sink given no spool (spool_max_bytes=0, or no room left) whose spool folder still holds
            # records: nothing reads them, said as for the spool of a sink not configured; what the
            # folder takes beyond the sink's unused spool room is not the others' either.
            newly = [s.name for s in self.specs if bounds[s.name][0] <= 0 and s.name not in held]
            held.update((name, self._report_spool_off(data, name)) for name in newly)
            if not (beside and newly and any(held.values())):
                break
            budget = budget_beside_spools_off(len(self.specs), beside, held)
            bounds = disk_bounds(self.specs, budget)
        if budget is not None and beside is not None:
            stranded += beside - budget
        if data and budget is not None:
            log.info(
                "data dir %s holds at most %.0f MiB%s: %s",
                data,
                budget / 2**20,
                f" (besides {stranded / 2**20:.1f} MiB of spools of sinks not configured or without a spool)"
                if stranded
                else "",
                "; ".join(
                    f"{name} spool {spool / 2**20:.0f} MiB, dead letters 2 x {dead / 2**20:.0f} MiB"
                    for name, (spool, dead) in bounds.items()
                ),
            )
        spools = {
            spec.name: Spool(
                data / "spool" / safe_name(spec.name),
                max_bytes=bounds[spec.name][0],
                cluster=self.settings.cluster_name,
            )
            for spec in self.specs
            if data is not None and bounds[spec.name][0] > 0
        }
        return bounds, spools

    def _build(self, opened: tuple[dict[str, tuple[int, int]], dict[str, Spool]] | None = None) -> None:
        """The pipelines, from ``opened`` (``_open_data_dir``'s, done here when not given)."""
        data = self.settings.data_dir
        table = CheckpointTable(max(1, len(self.specs)))
        bounds, spools = opened if opened is not None else self._open_data_dir()
        for index, spec in enumerate(self.specs):
            _, deadletter_bytes = bounds[spec.name]
            sink_dir = data / "sinks" / safe_name(spec.name) if data else None
            if sink_dir:
                sink_dir.mkdir(parents=True, exist_ok=True)
            logger = logging.getLogger(f"eventrouter.sink.{spec.name}")
            spool = spools.get(spec.name)
            context = SinkContext(
                name=spec.name,
                cluster=self.settings.cluster_name,
                data_dir=sink_dir,
                logger=logger,
                send_timeout=spec.pipeline.send_timeout,
                retry_wait_max=spec.pipeline.retry_wait_max,
                aside_max_events=aside_bound(
                    spec.pipeline,
                    spooled=spool is not None,
                    defer=getattr(spec.sink_cls, "defer_retries", False),
                ),
            )
            sink = spec.build(context)
            pipeline = Pipeline(
                name=spec.name,
                sink=sink,
                options=spec.pipeline,
                predicate=compile_filter(spec.filter),
                checkpoint=SinkCheckpoint(self._backend_factory(spec.name), table=table, index=index),
                deadletter=DeadLetter(
                    data / "deadletter" / f"{safe_name(spec.name)}.jsonl" if data else None,
                    sink=spec.name,
                    max_bytes=deadletter_bytes,
                    on_discard=self.metrics.dropped.labels(spec.name, "deadletter_rotated").inc,
                ),
                metrics=self.metrics,
                spool=spool,
                logger=logger,
            )
            self.pipelines.append(pipeline)
            reloader = SinkReloader(spec, pipeline, self.metrics, self._files_read.get(spec.name))
            if reloader.files:
                self.reloaders.append(reloader)
            log.info("sink %s configured", spec.describe())
        if self.checkpoint_store is not None:
            self.checkpoint_store.report_unconfigured()
        watch = self.settings.watch
        # The first-unseen times of a scoped watch go where the checkpoints go. Without either, the
        # checkpoints start empty at each start anyway.
        unseen: UnseenStore | None = self.checkpoint_store
        if unseen is None and data is not None:
            unseen = UnseenFile(data / "checkpoints" / "unseen.times")
        self.fanout = Fanout(
            self.pipelines,
            scoped=bool(self.settings.namespaces),
            selective=bool(watch.field_selector or watch.label_selector),
            unseen_store=unseen,
        )

    def _report_orphans(self, data: Path) -> int:
        """Say once at start what the data dir holds for sinks that are not configured (removed or
        renamed): their spooled occurrences reach nobody unless a sink of that name comes back.
        Returns the bytes those spools take."""
        configured = {safe_name(spec.name) for spec in self.specs}
        stranded = 0
        spools = data / "spool"
        for folder in sorted(spools.iterdir()) if spools.is_dir() else ():
            if folder.name in configured or not folder.is_dir():
                continue
            try:
                spool = Spool(folder, max_bytes=1 << 62, cluster=self.settings.cluster_name)
                # The parked FIFO's records are undelivered too (len counts the main FIFO only).
                parked = spool.parked_count
                count, size = len(spool) + parked, spool.bytes
                spool.close()
            except OSError as exc:
                log.warning(
                    "data dir: cannot read the spool %s of a sink that is not configured: %s", folder, exc
                )
                continue
            stranded += size
            self.metrics.orphaned.labels(folder.name).set(count)
            if count:
                log.warning(
                    "data dir: the spool of sink %r, which is not configured, holds %d occurrences "
                    "(%d of them parked; %.1f MiB) never delivered: configure a sink of that name again "
                    "to deliver them, or remove %s",
                    folder.name,
                    count,
                    parked,
                    size / 2**20,
                    folder,
                )
        letters = data / "deadletter"
        for path in sorted(letters.glob("*.jsonl")) if letters.is_dir() else ():
            with contextlib.suppress(OSError):
                # A replay's letters refused again (`<input>.refused-<sink>.jsonl`, replayed
                # from stdin into the data dir) are named by the replay that wrote them.
                if path.stem in configured or ".refused-" in path.name or not path.stat().st_size:
                    continue
                log.info(
                    "data dir: dead letters of sink %r, which is not configured, are in %s "
                    "(eventrouter replay can send them to another sink)",
                    path.stem,
                    path,
                )
        return stranded

    def _report_spool_off(self, data: Path, name: str) -> int:
        """A configured sink runs without a spool: say what its spool folder still holds (undelivered
        records a run with a spool kept, parked ones too) and count it as orphaned. Returns its bytes."""
        folder = data / "spool" / safe_name(name)
        if not folder.is_dir():
            return 0
        try:
            spool = Spool(folder, max_bytes=1 << 62, cluster=self.settings.cluster_name)
            parked = spool.parked_count
            count, size = len(spool) + parked, spool.bytes
            spool.close()
        except OSError as exc:
            log.warning(
                "data dir: cannot read the spool %s of sink %s, which has no spool now: %s", folder, name, exc
            )
            return 0
        self.metrics.orphaned.labels(folder.name).set(count)
        if count:
            log.warning(
                "data dir: sink %s runs without a spool (spool_max_bytes 0, or no room left within "
                "--data-dir-max-bytes), but its spool %s holds %d occurrences (%d of them parked; %.1f MiB) "
                "never delivered: they are not read; give the sink a spool again to deliver them, or "
                "remove the folder",
                name,
                folder,
                count,
                parked,
                size / 2**20,
            )
        return size

    def _guard(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if self._stopping or (task is not None and task.cancelling()):
                    raise
                # Nothing cancelled it: a CancelledError let out from within (a cancelled future
                # awaited in a library) ended the task unseen while the router looked healthy.
                log.error(
                    "task %s ended with a CancelledError though nothing cancelled it (a bug); stopping "
                    "the router",
                    name,
                )
                self.exit_code = 1
                self.request_stop()
            except Exception:
                log.exception("task %s crashed; stopping the router", name)
                self.exit_code = 1  # a restart policy (on-failure) must see it
                self.request_stop()
            except BaseException as exc:
                # One that is no Exception (GeneratorExit, a library's own kind) ended the task unseen
                # (never retrieved); SystemExit ended the router with exit 0. Ctrl-C goes on as it was.
                if raised_by_signal(exc):
                    raise
                log.error("task %s crashed; stopping the router", name, exc_info=exc)
                self.exit_code = 1
                self.request_stop()

        task = asyncio.create_task(guarded(), name=name)
        # Stopped before the task first ran: `coro` was never started; close it (no "never awaited").
        task.add_done_callback(lambda _: coro.close())
        return task

    async def start_pipelines(self) -> None:
        if self.settings.data_dir is not None:
            await self._lock_data_dir(self.settings.data_dir)
            await self._seed_checkpoint(self.settings.data_dir)
        # Off the event loop: opening the spools reads every record they hold (_open_data_dir).
        opening = asyncio.ensure_future(asyncio.to_thread(self._open_data_dir))
        try:
            opened = await asyncio.shield(opening)
        except asyncio.CancelledError:
            # Stopped meanwhile: the thread still reads (and may trim) the spool files, and the stop
            # must not give up the data dir's lock before it is done.
            await asyncio.wait([opening])
            raise
        self._build(opened)
        for p in self.pipelines:
            self._pipeline_tasks.append(self._guard(p.run(), f"pipeline:{p.name}"))
        if self.reloaders and self.settings.reload_interval > 0:
            self._tasks.append(self._guard(self._reload_sinks(), "sink-reload"))
        if self.settings.metrics_addr and self._http is None:
            await self._start_http(self.settings.metrics_addr)

    async def _seed_checkpoint(self, data: Path) -> None:
        """``checkpoint_seed_configmap``: the ConfigMap's checkpoint taken into the data dir's before the
        sinks load it. On an empty checkpoint store (the switch from the configMap mode onto a new claim)
        it becomes the data dir's, decided for the whole store: each configured sink gets a snapshot,
        empty for one the ConfigMap lacks. Over a checkpoint the data dir holds it is merged (the higher
        number of each entry), unless it is the state the data dir took last (SEED_TAKEN): a claim kept
        from an earlier dataDir period (the chart keeps it) holds that period's checkpoint, and the
        ConfigMap what the configMap mode delivered since, all of it again without the merge. Read at
        each start (a GET: nothing tells a data dir that a configMap period came between); decoded only
        when another state. A read that fails (forbidden, damaged, a timeout) is said, counted
        (``checkpoint_seeds{result="failed"}``) and left unrecorded, so the next start takes it: the
        router starts as without it (a seed never stops the start)."""
        name = self.settings.checkpoint_seed_configmap
        _drop_unfinished_seed(data / SEED_FOLDER)
        if name is None:
            return
        first = not _holds_checkpoint(data / "checkpoints")
        where = f"{self.settings.checkpoint_namespace}/{name}"
        taken = None
        if first:
            # An empty store took nothing, whatever a record says (its checkpoints removed by hand):
            # the record goes before this try, which may fail and record nothing.
            try:
                await asyncio.to_thread(_forget_seed, data)
            except OSError as exc:
                log.warning(
                    "checkpoint seed: cannot remove %s (%s), which names a checkpoint the data dir no "
                    "longer holds: a later start may take ConfigMap %s for one it took",
                    data / SEED_TAKEN,
                    exc.strerror or exc,
                    where,
                )
        else:
            taken = await asyncio.to_thread(_seed_taken, data)
        result, state = await self._take_seed(data, name, where, first, taken)
        self.metrics.checkpoint_seeds.labels(result).inc()
        if state is None or state == taken:
            return
        try:
            # Before any checkpoint file is written (_build): the record says what the files hold.
            await asyncio.to_thread(_record_seed, data, state)
        except OSError as exc:
            log.warning(
                "checkpoint seed: cannot write %s (%s): the next start decodes ConfigMap %s again and "
                "merges it (the same numbers: nothing changes)",
                data / SEED_TAKEN,
                exc.strerror or exc,
                where,
            )

    async def _take_seed(
        self, data: Path, name: str, where: str, first: bool, taken: str | None
    ) -> tuple[str, str | None]:
        """One try at the seed (``first``: on an empty checkpoint store, else over the data dir's own):
        "seeded", "unchanged" (the state ``taken``: not decoded), "absent" (the ConfigMap does not exist)
        or "failed" (said in one WARNING); and the ConfigMap state to record (SEED_TAKEN), None when
        none is."""
        fallback = (
            f"{SEED_EMPTY}; {SEED_AGAIN}"
            if first
            else f"{SEED_OWN}; {SEED_AGAIN}; {SEED_OWN_AGAIN.format(where=where)}"
        )
        kube = self._control or self.kube
        if kube is None:
            log.warning("checkpoint seed: no API client to read ConfigMap %s with; %s", where, fallback)
            return "failed", None
        store = ConfigMapCheckpointStore(kube, namespace=self.settings.checkpoint_namespace, name=name)
        try:
            obj = await self._read_seed(store)
        except (ApiError, aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            log.warning(
                "checkpoint seed: cannot read ConfigMap %s (%s); %s", where, failure_text(exc), fallback
            )
            return "failed", None
        if obj is None:
            absent = f"{where} absent"
            log.log(
                logging.DEBUG if absent == taken else logging.INFO,
                "checkpoint seed: ConfigMap %s does not exist; %s",
                where,
                "starting with an empty checkpoint"
                if first
                else "nothing to seed (read again at each start: one made later is merged)",
            )
            return "absent", absent
        version = configmap_version(obj)
        state = f"{where} {version}" if version else None
        if state is not None and state == taken:
            log.debug("checkpoint seed: ConfigMap %s is the one this data dir took last (%s)", where, version)
            return "unchanged", state
        try:
            found = await store.decode(obj)
        except (CheckpointFormatError, MemoryError) as exc:
            # Bounded by what a checkpoint can hold; whatever still fails costs this seed, never the start.
            log.warning(
                "checkpoint seed: ConfigMap %s holds no checkpoint that can be read (%s); %s",
                where,
                unreadable(exc),
                fallback,
            )
            return "failed", None
        del obj  # its text (up to ~1.4 MiB) not kept through the write
        # File work off the loop, run to its end: a stop meanwhile must not give up the data dir's lock
        # while the thread still writes in it. Written, and trimmed after, in the thread that decoded
        # it: each thread that allocates keeps a glibc arena malloc_trim does not empty (items
        # 242/261), and a second one kept ~28 MiB for the life of the process.
        write = self._write_seed if first else self._merge_seed
        writing = asyncio.ensure_future(in_checkpoint_thread(write, data, found, where, fallback))
        del found
        try:
            written = await asyncio.shield(writing)
        except asyncio.CancelledError:
            await asyncio.wait([writing])
            raise
        except MemoryError as exc:  # a seed's write left part-way is as one that failed (see each)
            _seed_not_written(where, None, unreadable(exc), fallback)
            return "failed", None
        await in_checkpoint_thread(release_free_memory)
        self.memory_trims += 1
        return ("seeded", state) if written else ("failed", None)

    async def _read_seed(self, store: ConfigMapCheckpointStore) -> dict[str, Any] | None:
        """``store.read_object()``, tried again while the failure may pass (429, 5xx, a broken
        connection), for SEED_READ_SECONDS at most."""
        deadline = time.monotonic() + SEED_READ_SECONDS
        delay = 0.5
        while True:
            try:
                async with asyncio.timeout(deadline - time.monotonic()):
                    return await store.read_object()
            except (ApiError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                if not _worth_retrying(exc) or time.monotonic() + delay >= deadline:
                    raise
                log.info(
                    "checkpoint seed: cannot read ConfigMap %s/%s yet (%s); trying again in %.1fs",
                    store.namespace,
                    store.name,
                    failure_text(exc),
                    delay,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _write_seed(self, data: Path, found: ConfigMapCheckpoint, where: str, fallback: str) -> bool:
        """The configured sinks' entries of ``found`` as the data dir's checkpoint (a snapshot each),
        all or nothing: written in SEED_FOLDER, which becomes ``checkpoints`` in one rename. A kill
        before it leaves no file in ``checkpoints``, so the next start seeds again; one sink written,
        another not, was a checkpoint the next start took as whole (the others got everything again).
        Each snapshot is written from the decoded column (``entries``), one sink at a time, no dict."""
        side, folder = data / SEED_FOLDER, data / "checkpoints"
        configured = [spec.name for spec in self.specs]
        try:
            side.mkdir()
            for sink in configured:
                FileCheckpoint(side, sink).compact(found.entries(sink))
            UnseenFile(side / "unseen.times").save_unseen(found.unseen_of(configured))
            put_folder_in_place(side, folder)
        except OSError as exc:
            shutil.rmtree(side, ignore_errors=True)  # else the next start removes it
            _seed_not_written(where, folder, exc.strerror or exc, f"no sink seeded: {fallback}")
            return False
        log.info(
            "checkpoint seeded from ConfigMap %s (read only, never written): %s%s",
            where,
            ", ".join(f"{sink}={len(found.entries(sink))}" for sink in configured),
            _ignored(found.sinks, configured),
        )
        return True

    def _merge_seed(self, data: Path, found: ConfigMapCheckpoint, where: str, fallback: str) -> bool:
        """A ConfigMap state the data dir has not taken (SEED_TAKEN: one a failed start could not read,
        one the configMap mode wrote while this claim was kept unmounted), taken over the checkpoint the
        data dir holds: each entry becomes the higher of its two numbers. The data dir's numbers are never
        lowered nor its entries dropped, so nothing accepted since is sent again; the ConfigMap adds
        only what its sink accepted, as the first start's seed does. Sink by sink, each snapshot
        replaced in one rename: after a kill or an error part-way SEED_TAKEN is not written yet and the
        next start merges again (the higher of two numbers, taken twice, is the same)."""
        folder = data / "checkpoints"
        configured = [spec.name for spec in self.specs]
        raised: dict[str, int] = {}
        try:
            for sink in configured:
                if seed := found.entries(sink):
                    raised[sink] = _raise_to(FileCheckpoint(folder, sink), seed)
            times = UnseenFile(folder / "unseen.times")
            known = times.load_unseen()
            if new := {u: t for u, t in found.unseen_of(raised).items() if u not in known}:
                times.save_unseen(known | new)
            sync_folder(folder)
        except OSError as exc:
            _seed_not_written(where, folder, exc.strerror or exc, fallback)
            return False
        log.info(
            "checkpoint seeded from ConfigMap %s (read only, never written) at a later start, over the data "
            "dir's own checkpoint, the higher number of each entry kept; entries raised or added: %s%s",
            where,
            ", ".join(f"{sink}={raised.get(sink, 0)}" for sink in configured),
            _ignored(found.sinks, configured),
        )
        return True

    async def _lock_data_dir(self, data_dir: Path) -> None:
        """Take the data dir's lock (datalock.py). Without leader election another holder is a mistake:
        DataDirInUse. With it, a new leader on a shared volume waits for the old one to finish its
        drain and exit (it is on standby meanwhile, so nothing is lost)."""
        data_dir.mkdir(parents=True, exist_ok=True)
        lock = self._data_lock = DataDirLock(data_dir)
        for attempt in itertools.count():
            try:
                lock.acquire()
                return
            except DataDirInUse as exc:
                if not self.settings.leader_elect:
                    raise
                if attempt % 10 == 0:  # one line every 10 s
                    log.warning("%s; waiting for it before delivering", exc)
            await asyncio.sleep(1.0)

    async def run(self, kube: KubeClient | None = None) -> None:
        """The ``run`` command's lifecycle: serve probes, elect a leader when asked, then build the
        pipelines and watch; returns once ``stop()`` finished."""
        s = self.settings
        if s.metrics_addr and self._http is None:
            await self._start_http(s.metrics_addr)
        self.kube = kube or await connect(
            kubeconfig=s.kubeconfig, context=s.context, connections=self._connections_needed()
        )
        # The lease and the ConfigMap never wait behind the watches' connections (item 186).
        control = self._control = (
            self.kube.own_connections() if s.checkpoint_configmap or s.leader_elect else None
        )
        if s.checkpoint_configmap and control is not None:
            store = ConfigMapCheckpointStore(
                control,
                namespace=s.checkpoint_namespace,
                name=s.checkpoint_configmap,
                flush_interval=s.checkpoint_flush_interval,
            )
            self.checkpoint_store = store
            store.on_write = self._configmap_written
            store.on_trim = self._configmap_trimmed
            self._backend_factory = store.backend
        if s.leader_elect and control is not None:
            self.elector = LeaderElector(
                control,
                namespace=s.leader_namespace,
                name=s.leader_name,
                identity=s.leader_identity,
                lease_duration=s.lease_duration,
                renew_deadline=s.renew_deadline,
                retry_period=s.retry_period,
                metrics=self.metrics,
            )
            log.info(
                "standing by for the lease %s/%s as %s", s.leader_namespace, s.leader_name, s.leader_identity
            )
            # Released by stop(), after its last checkpoint write, also when the lead fails: released in
            # run(), the next leader could read the checkpoint before that write.
            election = self.elector.run(self._lead, self._lost_lease, release_on_failure=False)
            self._tasks.append(self._guard(election, "leader-election"))
        else:
            # A task of its own, which stop() cancels before it closes the kube client: awaited here,
            # a SIGTERM while the checkpoint ConfigMap could not be read left its retry running into
            # the closed client ("Session is closed"), a traceback and exit 1. Its errors (the data
            # dir in use) are still raised from here.
            lead = asyncio.create_task(self._lead(), name="lead")
            self._tasks.append(lead)
            try:
                await lead
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if not lead.cancelled() or (current is not None and current.cancelling()):
                    raise  # run() itself was cancelled
        await self.stopped.wait()

    def _configmap_written(self, ok: bool) -> None:
        if not ok:
            self.metrics.checkpoint_configmap_errors.labels("write").inc()
        for p in self.pipelines:
            self.metrics.checkpoint_durable.labels(p.name).set(1 if ok else 0)

    def _configmap_trimmed(self) -> None:
        self.memory_trims += 1  # the store's trim after a large write, beside the router's own

    async def _load_checkpoint(self, store: ConfigMapCheckpointStore) -> None:
        """Read the shared checkpoint, retrying with backoff: a failover is when the API server is most
        likely to answer 5xx or 429 once, and giving up made both replicas crash-loop. (A lost lease
        cancels this.) Failures are counted, and /healthz fails once they outlast --stall-timeout (the
        liveness probe restarts the pod, which releases the lease to the standby)."""
        delay = 0.5
        while True:
            try:
                await store.load()
                self._lead_blocked = None
                return
            except (ApiError, aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                self.metrics.checkpoint_configmap_errors.labels("read").inc()
                why = failure_text(exc)
                self._lead_blocked = (
                    f"cannot read the checkpoint ConfigMap {store.namespace}/{store.name} ({why})"
                )
                log.error(
                    "cannot read the checkpoint ConfigMap %s/%s (%s); retrying in %.1fs",
                    store.namespace,
                    store.name,
                    why,
                    delay,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def _lead(self) -> None:
        """Start delivering: load the shared checkpoint (the previous leader's latest), then pipelines
        and the watch (a relist gives each sink what it has not accepted yet)."""
        self._leading_since, self._leading_mono = time.time(), time.monotonic()
        if self.checkpoint_store is not None:
            await self._load_checkpoint(self.checkpoint_store)
            self._tasks.append(self._guard(self.checkpoint_store.run(), "checkpoint-configmap"))
        await self.start_pipelines()
        await self.start_source(self.kube)
        if self.elector is not None:
            await asyncio.Event().wait()  # lead until the elector cancels this task

    async def _lost_lease(self) -> None:
        """Called before the lease can expire for the others: stop delivering at once and exit, so
        the new leader alone delivers from the checkpoint (Kubernetes restarts us as a standby).
        Also called when the lead itself failed: the lease is still held then, and the stop releases
        it after its last checkpoint write; "lost the lease" there sent operators to the API server
        (review-b N1)."""
        if self.elector is not None and self.elector.lead_failed:
            log.error(
                "could not start leading (the failure is logged above): stopping delivery now; the lease "
                "is released once the stop has written the checkpoint, and a standby takes over from it"
            )
        else:
            log.error("lost the lease: stopping delivery now; the new leader resumes from the checkpoint")
        self.exit_code = 1
        if self.elector is not None:
            self.elector.stop()  # never lead again from this process: it exits and restarts as a standby
        for p in self.pipelines:
            p.stop_now()
        # A send in progress is abandoned too (its batch is left over): it could otherwise go on for
        # up to send_timeout while the new leader delivers. Its outcome is unknown: at most that
        # batch comes twice.
        for t in self._pipeline_tasks:
            t.cancel()
        self.request_stop()

    # ---- source -------------------------------------------------------------------------------

    def _listed(self, namespace: str | None) -> None:
        self._listed_namespaces.add(namespace)
        if self._trim_task is None or self._trim_task.done():
            self._trim_task = self._guard(self._trim_after_burst(), "memory-trim")
        expected: list[str | None] = [*self.settings.namespaces] or [None]
        if all(ns in self._listed_namespaces for ns in expected):
            # Prune checkpoints only with a complete picture of every watched namespace: each has
            # completed a list, and a tracker is pruned only when a list completes, so one relisting
            # now still holds every event of its last. The lists' uid sets are not kept (2 MiB per
            # 50,000 events): the trackers hold the same uids, less the malformed items.
            tracked = self._tracked()
            self._prune(tracked)
            if not self._keys_shared:
                self._keys_shared = True
                self.fanout.share_keys(tracked)

    def _tracked(self) -> Collection[str]:
        """Every event uid the watchers' trackers hold (a view for one watcher, no copy)."""
        if len(self.watchers) == 1:
            return self.watchers[0].tracker.seen.keys()
        live: set[str] = set()
        for w in self.watchers:
            live.update(w.tracker.seen)
        return live

    def _connections_needed(self) -> int:
        """API requests open at once: a watch per namespace for as long as it lasts, and a list of
        each (a relist after a 410), with room for the rest (the Event API's probes)."""
        return 2 * len(self.settings.namespaces) + 10

    async def start_source(self, kube: KubeClient | None = None) -> None:
        self.kube = kube or await connect(
            kubeconfig=self.settings.kubeconfig,
            context=self.settings.context,
            connections=self._connections_needed(),
        )
        # The first list waits for each sink's first start (bounded by its send_timeout): a relist
        # is paced by the sinks' queues (Fanout.wait_for_room), and a sink still starting (a Kafka
        # bootstrap, a TLS handshake) takes nothing, so its queue would overflow without a spool.
        await asyncio.gather(*(p.start_tried.wait() for p in self.pipelines))
        if self._stopping:
            return  # stopped meanwhile (a SIGTERM right after taking the lease): no watch to start
        namespaces: list[str | None] = [*self.settings.namespaces] or [None]
        # A list page must fit in the smallest memory queue, or a relist would overflow it.
        smallest = min((p.queue_max for p in self.pipelines), default=1000)
        relist_sorted, relist_dir = self._relist_order()
        watch = dataclasses.replace(
            self.settings.watch,
            page_size=max(10, min(self.settings.watch.page_size, smallest // 2)),
            relist_sorted=relist_sorted,
            relist_dir=relist_dir,
        )
        # One for all the watchers: namespaces relisting together are handed on in one time order,
        # within one memory budget (relist_merge.py).
        relists = shared_relists(watch, self.settings.cluster_name)
        for ns in namespaces:
            watcher = EventWatcher(
                self.kube,
                namespace=ns,
                tracker=OccurrenceTracker(cluster=self.settings.cluster_name),
                publish=self.fanout.publish,
                forget=self.fanout.forget,
                listed=self._listed,
                metrics=self.metrics,
                settings=watch,
                room=self.fanout.wait_for_room,
                needed=self.fanout.needed,
                relists=relists,
            )
            self.watchers.append(watcher)
            self._tasks.append(self._guard(watcher.run(), f"watch:{ns or '*'}"))
        self._tasks.append(self._guard(self._prune_deleted(), "checkpoint-prune"))
        self._tasks.append(self._guard(self._trim_periodically(), "memory-trim-periodic"))
        if self.settings.data_dir is not None:
            self._tasks.append(self._guard(self._retry_checkpoints(), "checkpoint-retry"))

    async def _retry_checkpoints(self) -> None:
        """A checkpoint that could not be written (a full disk) is retried on each ack; this also
        retries it in a quiet cluster, where acks may not come for a long time."""
        while True:
            await asyncio.sleep(SinkCheckpoint.retry_interval)
            for p in self.pipelines:
                p.checkpoint.retry()

    def reload_files(self) -> None:
        """SIGHUP: re-read the sinks' credential, certificate and template files now, as the periodic
        check would once they have settled (the sender says they have)."""
        log.info(
            "SIGHUP: re-reading the sinks' credential, certificate and template files "
            "(other configuration changes need a restart)"
        )
        rebuilt = [r.spec.name for r in self.reloaders if r.check() or r.check()]
        log.info("SIGHUP: %s", f"rebuilt {', '.join(rebuilt)}" if rebuilt else "no sink's files changed")

    async def _reload_sinks(self) -> None:
        """Rebuild a sink whose credential, certificate or template file changed (engine/reload.py)."""
        interval = self.settings.reload_interval
        while True:
            settling = any(r.settling for r in self.reloaders)
            await asyncio.sleep(min(interval, SETTLE) if settling else interval)
            for reloader in self.reloaders:
                reloader.check()

    async def _prune_deleted(self) -> None:
        """Drop checkpoint entries of deleted events. A sink behind the events' TTL (a backlog on
        disk) accepts occurrences after their DELETED has already cleared their entries; nothing would
        remove those until the next relist, so its checkpoint would grow with every one. Only between
        lists: a list in progress (or failed midway) is not a complete picture."""
        while True:
            await asyncio.sleep(self.settings.checkpoint_prune_interval)
            watchers = self.watchers
            if not watchers or not all(w.initial_list_done.is_set() and not w.listing for w in watchers):
                continue
            self._prune(self._tracked())

    def _prune(self, live: Collection[str]) -> None:
        self.fanout.prune(live)
        if self.checkpoint_store is not None and not self.fanout.scoped:
            # A scoped watch does not see every event: the entries of sinks not configured then wait
            # for their keep period only (UNCONFIGURED_KEEP), as those of unseen events do.
            self.checkpoint_store.prune_unconfigured(live)

    def _trim(self, *, caches: bool = False) -> None:
        # glibc's malloc_trim: ~10 ms on a 60 MB heap, ~60 ms when it has much to return.
        self.memory_trims += 1
        if caches:
            # After a burst: the cache entries it filled (every value it saw) would stay, with their heap.
            self.cache_entries_cleared += clear_caches()
        release_free_memory()

    async def _trim_after_burst(self) -> None:
        """Once the memory queues have drained after a relist, empty the encoding caches and hand the
        freed memory back to the OS (a slow sink's backlog in its disk spool does not hold this up)."""
        await self._wait_while_draining(lambda: [p for p in self.pipelines if p.queued > p.queue_max // 2])
        self._trim(caches=True)

        # A sink still catching up (from its spool, its memory queue, a batch in flight) frees what
        # it decodes and encodes: once more when all have. After the spools have drained the rest
        # gets 30 s, as a steady load may never leave every pipeline empty at once.
        if any(p.depth for p in self.pipelines):
            await self._wait_while_draining(
                lambda: [p for p in self.pipelines if p.spool is not None and len(p.spool)]
            )
            await self._wait_while_draining(lambda: [p for p in self.pipelines if p.depth], limit=30)
            self._trim(caches=True)

    async def _wait_while_draining(
        self, waiting_for: Callable[[], list[Pipeline]], limit: float | None = None
    ) -> None:
        """Until ``waiting_for()`` is empty, ``limit`` seconds have passed, or its pipelines' backlog
        (queue and spool) has not come down for ``burst_trim_patience`` seconds: a sink that is down
        keeps its queue full and its spool growing, and must not hold the trim off while it is."""
        start = time.monotonic()
        lowest, since = -1, start
        while pipelines := waiting_for():
            now = time.monotonic()
            backlog = sum(p.depth for p in pipelines)
            if lowest < 0 or backlog < lowest:
                lowest, since = backlog, now
            elif now - since >= self.burst_trim_patience:
                return
            if limit is not None and now - start >= limit:
                return
            await asyncio.sleep(1)

    async def _trim_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.settings.memory_trim_interval)
            self._trim()

    async def replay(
        self, objects: Iterable[tuple[str, Any]], *, page: int = 500, dead_letters: bool | None = None
    ) -> tuple[int, int]:
        """Route recorded (type, object) pairs through the same tracker and pipelines, pausing every
        ``page`` objects (at most half the smallest memory queue) while a working sink is backlogged.
        When a sink wants time order (Loki), the whole file is read first and handed on oldest first,
        as a relist is: a recording or a dead-letter file is in file order, not time order.

        ``dead_letters`` (by default: when ``objects`` has an ``origin``, as the replay command's
        input of a dead-letter file has): every distinct (uid, number) is sent, and the whole file is
        handed on in event time order, numbers rising per event. It is in the order its sink gave up
        on them ((uid, 5) refused at once, (uid, 3) given up later): the tracker skipped 3 as a
        lowered count, and 3 sent after 5 was accepted is skipped by the sink's checkpoint.
        Returns (occurrences, malformed)."""
        self._replaying = True
        smallest = min((p.queue_max for p in self.pipelines), default=1000)
        page = max(1, min(page, smallest // 2))
        if dead_letters is None:
            dead_letters = getattr(objects, "origin", None) is not None
        tracker = OccurrenceTracker(cluster=self.settings.cluster_name, exact=dead_letters)
        relist_sorted, relist_dir = self._relist_order()
        order = (
            RelistOrder(cluster=tracker.cluster, directory=relist_dir)
            if relist_sorted or dead_letters
            else None
        )
        try:
            return await self._replay(objects, tracker, order, page)
        finally:
            if order is not None:
                order.close()

    def halt_replay(self) -> None:
        """``replay`` hands nothing more on (a replay stopped by a signal, as ``eventrouter replay``
        is by SIGINT, SIGTERM or SIGHUP): what was handed on is delivered, or left at the stop as at
        --timeout; the rest stays in the input."""
        self._replay_halt.set()

    async def _replay_room(self) -> bool:
        """``fanout.wait_for_room()`` and a turn for the pipelines, unless the replay is halted
        meanwhile (a slow sink kept a Ctrl-C waiting for its queue): False once it is. One intake
        only, so the hop a task adds after the wait admits no other intake's hand-on before ours."""
        halt = self._replay_halt
        if halt.is_set():
            return False
        room = asyncio.ensure_future(self.fanout.wait_for_room())
        halted = asyncio.ensure_future(halt.wait())
        try:
            await asyncio.wait({room, halted}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            room.cancel()
            halted.cancel()
            await asyncio.gather(room, halted, return_exceptions=True)
        if not halt.is_set():
            await asyncio.sleep(0)  # let the pipelines take what is queued
        return not halt.is_set()

    def _relist_order(self) -> tuple[bool, str | None]:
        """Whether lists (and replays) are handed on oldest first, and where they wait meanwhile."""
        data_dir = str(self.settings.data_dir) if self.settings.data_dir else None
        return (
            self.settings.watch.relist_sorted or any(p.sink.wants_time_order for p in self.pipelines),
            self.settings.watch.relist_dir or data_dir,
        )

    async def _replay(
        self,
        objects: Iterable[tuple[str, Any]],
        tracker: OccurrenceTracker,
        order: RelistOrder | None,
        page: int,
    ) -> tuple[int, int]:
        count = malformed = seen = handed = 0
        # Reading a file never yields to the loop: until a sink has started, nothing would take from
        # its queue, and a file larger than the queue would overflow it before the sink ran at all.
        await asyncio.gather(*(p.start_tried.wait() for p in self.pipelines))
        halt = self._replay_halt
        for kind, obj in objects:
            if halt.is_set():
                break
            self.metrics.watch_events.labels(kind).inc()
            if kind in ("DELETED", "BOOKMARK", "ERROR"):
                continue
            if kind not in ("ADDED", "MODIFIED", "LIST"):
                # As the live watch does: counted and said, not skipped without a trace.
                malformed += 1
                self.metrics.source_dropped.labels("unknown_watch_type").inc()
                log.warning("replay: skipped an object recorded with the unknown watch type %r", kind)
                continue
            seen += 1
            # Also after each INTAKE_ROOM of bytes handed on: 500 large events at once overflowed the
            # memory queues' byte bound (``queue_max_bytes``), and without a spool the oldest went.
            if seen % page == 0 or handed >= INTAKE_ROOM:
                handed = 0
                if not await self._replay_room():
                    break
            try:
                occ = tracker.observe(obj)
            except MalformedEvent as exc:
                malformed += 1
                self.metrics.source_dropped.labels("malformed").inc()
                log.warning("replay: skipped malformed event: %s", exc)
                continue
            if occ is not None:
                count += 1
                self.metrics.occurrences.inc()
                if order is not None:
                    order.add(occ)
                else:
                    self.fanout.publish(occ)
                    handed += queue_cost(occ)
            elif tracker.dropped:  # a lowered count, a series not raised: counted as the watch does
                for reason, n in tracker.take_dropped().items():
                    self.metrics.source_dropped.labels(reason).inc(n)
        if order is not None and len(order) and not halt.is_set():
            log.info("replay: handing %d occurrences to the sinks, oldest first", len(order))
            chunks = order.drain(page)
            for chunk in _numbers_rising(chunks) if tracker.exact else chunks:
                for occ in chunk:
                    if handed >= INTAKE_ROOM:
                        handed = 0
                        if not await self._replay_room():
                            return count, malformed
                    self.fanout.publish(occ)
                    handed += queue_cost(occ)
                handed = 0
                if not await self._replay_room():
                    return count, malformed
        return count, malformed

    def publish(self, occ: Occurrence) -> None:
        self.fanout.publish(occ)

    # ---- health -------------------------------------------------------------------------------

    def healthy(self) -> tuple[bool, str]:
        # The monotonic clock: a wall clock stepped forward (NTP, a VM resumed) is no stall.
        mono = time.monotonic()
        if not self.watchers:
            if self._leading_since is None:
                return True, "no watch (replay or standby)"
            # A leader that cannot get to its watch (the checkpoint ConfigMap unreadable: RBAC, 5xx)
            # held the lease for ever, healthy: it now fails as a stalled watch would, so the
            # liveness probe restarts it and the standby takes over.
            waited = mono - self._leading_mono
            why = f"leading for {waited:.0f}s, the watch has not begun"
            if self._lead_blocked:
                why += f": {self._lead_blocked}"
            if waited > self.settings.stall_timeout:
                return False, f"{why} (more than --stall-timeout {self.settings.stall_timeout:g}s)"
            return True, why
        stale = [w for w in self.watchers if mono - w.progressed > self.settings.stall_timeout]
        if stale:
            ages = ", ".join(f"{w.where}: {mono - w.progressed:.0f}s" for w in stale)
            return False, f"watch made no progress within {self.settings.stall_timeout:g}s ({ages})"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining"
        if self.elector is not None and not self.elector.is_leader:
            # Ready even when it can never lead (the Lease refused): a standby must be Ready for a
            # rollout to go on and for its /metrics behind the Service; the reason says what is wrong.
            return True, f"standby: {self.elector.standby_reason()}"
        if not self.watchers:
            if self._lead_blocked:
                return False, f"leading, but the watch has not begun: {self._lead_blocked}"
            return False, "starting: the watch has not begun"
        waiting = [w.where for w in self.watchers if not w.initial_list_done.is_set()]
        if waiting:
            return False, "initial list not done: " + ", ".join(waiting)
        not_started = [p.name for p in self.pipelines if not p.started.is_set()]
        if not_started:
            return False, "sinks not started: " + ", ".join(not_started)
        return True, "ok"

    async def _start_http(self, addr: str) -> None:
        host, _, port = addr.rpartition(":")
        app = web.Application()

        async def metrics(_: web.Request) -> web.Response:
            for p in self.pipelines:
                p.flush_metrics()
                # The memory queue and the items set aside in memory: the spool has a gauge of its
                # own (depth would count it twice with spool_depth).
                self.metrics.queue_depth.labels(p.name).set(p.queued)
            if self.checkpoint_store is not None:
                self.metrics.checkpoint_truncated.set(self.checkpoint_store.truncated)
            if self.watchers:
                self.metrics.last_progress.set(min(w.last_progress for w in self.watchers))
                for w in self.watchers:
                    w.flush_metrics()  # a watch without bookmarks flushed only when its stream ended
                    w.tracked_gauge()
            elif self._leading_since is not None:
                # A leader not watching yet (its first list waits for its sinks to start, or the
                # checkpoint ConfigMap cannot be read): as /healthz judges it, from taking the lease.
                self.metrics.last_progress.set(self._leading_since)
            else:
                # A standby: nothing to watch, and fine; 0 would fire EventrouterWatchStalled.
                self.metrics.last_progress.set(time.time())
            body = generate_latest(self.metrics.registry)
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

        def probe(check: Callable[[], tuple[bool, str]]) -> Callable[[web.Request], Awaitable[web.Response]]:
            async def handler(_: web.Request) -> web.Response:
                ok, why = check()
                return web.Response(status=200 if ok else 503, text=why + "\n")

            return handler

        app.router.add_get("/metrics", metrics)
        app.router.add_get("/healthz", probe(self.healthy))
        app.router.add_get("/readyz", probe(self.ready))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            self.http_port, where = await _listen(runner, host, int(port))
        except (OSError, OverflowError) as exc:
            await runner.cleanup()
            code = getattr(exc, "errno", None)
            why = os.strerror(code) if code else str(exc)
            raise ValueError(f"metrics address {addr}: cannot listen there ({why})") from None
        self._http = runner
        log.info("serving /metrics /healthz /readyz on %s", where)

    # ---- lifecycle ----------------------------------------------------------------------------

    def request_stop(self) -> None:
        if not self._stopping:
            self._stopping = True
            asyncio.get_running_loop().create_task(self.stop(), name="router-stop")

    async def drain(self, timeout: float | None = None) -> bool:
        """Close every pipeline and wait for their queues to empty. True if all drained in time."""
        for p in self.pipelines:
            p.close()
        if not self._pipeline_tasks:
            return True
        _, pending = await asyncio.wait(self._pipeline_tasks, timeout=timeout)
        return not pending

    async def stop(self) -> None:
        """Stop watching, drain within the deadline, persist what is left, release everything."""
        began = time.monotonic()
        self._stopping = True
        self.draining = True
        if self._trim_task is not None:
            self._tasks.append(self._trim_task)
        # A leader keeps its lease and keeps writing the shared checkpoint while it drains: a standby
        # taking over meanwhile would deliver beside it, from a checkpoint without the drain's acks.
        # A renewal that fails during the drain stops delivery at once (_lost_lease).
        leading = self.elector is not None and self.elector.is_leader
        lasting = [
            t for t in self._tasks if leading and t.get_name() in ("leader-election", "checkpoint-configmap")
        ]
        for t in self._tasks:
            if t not in lasting:
                t.cancel()
        await asyncio.gather(*(t for t in self._tasks if t not in lasting), return_exceptions=True)
        started = time.monotonic()
        drained = await self.drain(self.settings.shutdown_timeout)
        if not drained:
            for p in self.pipelines:
                p.stop_now()
                # A write blocked in a sink's thread (stdout's reader away, a hung file system) ends
                # at its line and its send says what went out: left to go on, it landed after its
                # batch was spooled below, and the restart wrote it again (Sink.stop_sending).
                try:
                    p.sink.stop_sending()
                except BaseException as exc:  # a plugin's bug must not stop the stop
                    if raised_by_signal(exc):
                        raise
                    p.log_fault(logging.ERROR, "sink %s: stop_sending() failed", p.name, exc=exc)
            # A send in progress gets a moment to finish; its outcome is unknown after that.
            await asyncio.wait(self._pipeline_tasks, timeout=1)
            for t in self._pipeline_tasks:
                t.cancel()
            await self._wait_cancelled_pipelines()
        scan_until = time.monotonic() + STOP_SCAN_SECONDS
        spooled: list[tuple[Pipeline, int]] = []  # sinks with a spool, and the leftovers each kept
        for p in self.pipelines:
            older, newer = p.leftovers()
            left = older + newer
            if not left:
                p.settle_at_stop()  # nothing pending: whatever was held back can be recorded
                if p.spool is not None:
                    p.spool.keep_aside([])
                    spooled.append((p, 0))
                continue
            if p.spool is not None:
                kept = 0
                dropped: list[str] = []
                owed = p.owed_at_stop(left)
                try:
                    rest = left
                    failed: OSError | None = None
                    if older and len(p.spool):
                        # Older than the spool's backlog: before it (a newer occurrence of the same
                        # event delivered first would make the checkpoint skip the older one as a copy).
                        try:
                            p.spool.prepend(older, owed)  # all or nothing, but for those left in place
                            kept = len(older)
                        except OSError as exc:  # what waited behind the spool may still fit: tried
                            failed, kept = exc, p.spool.kept_in_place  # read back: left where they were
                        rest = newer
                    for occ in rest:
                        try:
                            dropped.extend(p.spool.extend([occ], owed))
                        except OSError as exc:  # the next may still be kept (left where it was spooled)
                            failed = failed or exc
                            continue
                        kept += 1
                    if failed is not None:
                        raise failed
                    # Only once they are on disk (before, a crash would lose them), and only when the
                    # spool is read by whoever reads this checkpoint: a ConfigMap checkpoint is read
                    # by the next leader, which has a spool of its own, and would skip X/4 for good.
                    if self.checkpoint_store is None:
                        p.settle_at_stop()
                    p.spool.keep_aside([])  # what was set aside is among the leftovers just kept
                except OSError as exc:
                    self.metrics.data_dir_errors.labels(p.name, "spool").inc()
                    self.metrics.dropped.labels(p.name, "spool_error").inc(len(left) - kept)
                    log.error(
                        "sink %s: cannot write the disk spool at shutdown (%s): %d undelivered occurrences "
                        "not kept; re-delivered after restart only while the API server still holds them",
                        p.name,
                        exc.strerror or exc,
                        len(left) - kept,
                    )
                finally:
                    dropped += p.spool.lost_on_error  # dropped by the append whose write then failed
                    p.spool.lost_on_error = []
                    for lost in dropped:
                        self.metrics.dropped.labels(p.name, "spool_full").inc()
                        log.warning("sink %s: spool full at shutdown, dropped %s", p.name, lost)
                    p.tell_spool_drops()
                spooled.append((p, kept))
            else:
                self.metrics.dropped.labels(p.name, "shutdown").inc(len(left))
                log.warning(
                    "sink %s: %d occurrences not delivered within the %gs drain deadline; %s",
                    p.name,
                    len(left),
                    self.settings.shutdown_timeout,
                    "they are still in the replay's input"
                    if self._replaying
                    else "without --data-dir they are re-delivered after restart only while the API server "
                    "still holds them",
                )
        # The marks of deleted events first (a mark not checked is kept, and in a full ConfigMap it
        # pushes a live entry out: item 124), each sink a fair share of what is left, so one sink's
        # long spool cannot leave the next none; then the stop report's scans with the rest.
        for i, (p, _) in enumerate(spooled):
            now = time.monotonic()
            p.keep_gone(now + max(0.0, scan_until - now) / (len(spooled) - i))
        for p, kept in spooled:
            self._say_left(p, kept, scan_until)
            # A segment these scans could not read: no pop follows to count it (the pipeline's loop did).
            if p.spool is not None and p.spool.read_errors:
                self.metrics.data_dir_errors.labels(p.name, "spool").inc(p.spool.read_errors)
                p.spool.read_errors = 0
        for p in self.pipelines:
            p.flush_metrics()
            if p.spool is not None:
                p.spool.commit()
                p.spool.close()
            try:
                p.checkpoint.close()
            except OSError as exc:
                log.error(
                    "sink %s: cannot persist checkpoint: %s; what it accepted since its last write is "
                    "delivered again after the restart",
                    p.name,
                    exc,
                )
                # A stop that will duplicate must not look clean (as for the ConfigMap below).
                self.exit_code = self.exit_code or 1
        self.fanout.save_unseen()  # before the ConfigMap's last write, which carries them
        for t in lasting:
            if t.get_name() == "checkpoint-configmap":
                # Safe wherever it is: an encoding is given up, a request already sent finishes on its
                # own and the last write waits for it (ConfigMapCheckpointStore._settle), not a 409.
                t.cancel()
                await asyncio.gather(t, return_exceptions=True)
        if self.checkpoint_store is not None:
            try:
                flushed = await self._final_configmap_write(self.checkpoint_store, began)
            except Exception as exc:
                log.error("cannot persist the checkpoint ConfigMap: %s", exc)
                flushed = False
            if not flushed:
                # What was delivered since the last write comes again after the restart: say so in
                # the exit code too, not only in the log.
                self.exit_code = self.exit_code or 1
            elif left_out := self.checkpoint_store.truncated:
                # Written, but without the entries that did not fit: the next leader delivers those
                # events again, a stop that will duplicate as the one above.
                log.error(
                    "the last write of the checkpoint ConfigMap %s/%s left out %d entries (over 1 MiB): "
                    "the next leader delivers those events again; use --data-dir for clusters this large",
                    self.checkpoint_store.namespace,
                    self.checkpoint_store.name,
                    left_out,
                )
                self.exit_code = self.exit_code or 1
        # The lease goes right after the last checkpoint write, before the sinks close (review-b F2):
        # what the next leader reads is written, and nothing of this stop's changes it. Released after
        # the closes, one hung close (a broker gone) kept renewing the lease, and every replica off it,
        # for shutdown_timeout + 4 s; a slow release then met the SIGKILL, and the standby waited a
        # lease duration more. Whatever lands after the release (a send that swallowed its
        # cancellation, a close that flushes) was not acknowledged: the checkpoint just written does
        # not count it, so the next leader sends it again (a duplicate, never a skip), as before.
        if self.elector is not None:
            await self.elector.release()
        # After what must be kept is written: a sink's close cannot change it, and one hung close
        # (a broker gone, a plugin's bug) used to run the stop past the kubelet's SIGKILL first.
        cancelled = await self._close_sinks(began)
        # The data dir's lock only after the closes: a closing sink may still write its files there
        # (the webhook's set-aside keys, the file sink's flush), and another router may not meanwhile.
        if self._data_lock is not None:
            self._data_lock.release()
        if self.kube is not None:
            await self.kube.close()
        if self._control is not None:
            await self._control.close()
        if self._http is not None:
            await self._http.cleanup()
        log.info("stopped after draining for %.2fs", time.monotonic() - started)
        self.stopped.set()
        if cancelled:
            raise asyncio.CancelledError  # the stop's own cancellation, once the rest was done

    async def _wait_cancelled_pipelines(self) -> None:
        """Wait for the cancelled pipeline tasks, at most ``CLOSE_LEAST``: a send that swallows its
        cancellation held the stop for ever (no spool, checkpoint or ConfigMap write; the lock and
        the lease kept until SIGKILL). Such a pipeline's batch in flight goes with its leftovers:
        spooled, and sent again after the restart (twice, if the send still lands)."""
        if not self._pipeline_tasks:
            return
        _, pending = await asyncio.wait(self._pipeline_tasks, timeout=CLOSE_LEAST)
        for p, t in zip(self.pipelines, self._pipeline_tasks, strict=False):
            if t in pending:
                p.abandon()
                log.error(
                    "sink %s: its send did not end %gs after it was cancelled (it swallows its "
                    "cancellation); going on with the stop without it: its batch in flight is kept with "
                    "what is left, and sent again after the restart",
                    p.name,
                    CLOSE_LEAST,
                )

    async def _close_sinks(self, began: float) -> bool:
        """Close every sink at once, within what the grace period leaves (at least ``CLOSE_LEAST``);
        True when the stop itself was cancelled meanwhile. One after another, each bounded by its
        send_timeout, a few hung closes added up past the kubelet's SIGKILL."""
        tasks = {asyncio.create_task(self._close_sink(p), name=f"close-{p.name}"): p for p in self.pipelines}
        if not tasks:
            return False
        end = began + self.settings.shutdown_timeout + STOP_AFTER_DRAIN - LEASE_RELEASE_RESERVE
        cancelled = False
        why = "no time left in the grace period"
        try:
            await asyncio.wait(tasks, timeout=max(end - time.monotonic(), CLOSE_LEAST))
        except asyncio.CancelledError:
            cancelled, why = True, "the stop was cancelled"
        for t, p in tasks.items():
            if not t.done():
                log.warning("sink %s: not closed (%s); going on with the stop", p.name, why)
                t.cancel()
        # Bounded again: a plugin that swallows its cancellation must not hold the stop either.
        await asyncio.wait(tasks, timeout=CLOSE_LEAST)
        return cancelled

    async def _close_sink(self, p: Pipeline) -> None:
        """Close ``p``'s sink (``Pipeline.close_sink``: send_timeout an instance). Nothing a sink's
        ``aclose`` does ends the stop: what follows (the lock and lease releases) was skipped, and a
        CancelledError the sink let out ended the stop unfinished (``run()`` never returned: the pod
        hung until SIGKILL)."""
        try:
            await p.close_sink()
        except asyncio.CancelledError:
            if cancelled_now():
                return  # by _close_sinks, which says why
            log.error("sink %s: closing it %s", p.name, STRAY_CANCEL)
        except BaseException as exc:
            if raised_by_signal(exc):
                raise
            p.log_fault(logging.ERROR, "sink %s: closing it failed; going on with the stop", p.name, exc=exc)

    async def _final_configmap_write(self, store: ConfigMapCheckpointStore, began: float) -> bool:
        """The stop's last ConfigMap write, tried again on a 409, 429, 5xx, timeout or lost connection
        (a failover is when the API server is busiest) while the lease is held, before it is released:
        given up at once, the next leader delivered again all accepted since the previous write. Within
        what the grace period leaves (``STOP_AFTER_DRAIN`` after --shutdown-timeout from ``began``, less
        ``LEASE_RELEASE_RESERVE``) and at most the renew deadline; each attempt bounded by it."""
        deadline = min(
            began + self.settings.shutdown_timeout + STOP_AFTER_DRAIN - LEASE_RELEASE_RESERVE,
            time.monotonic() + self.settings.renew_deadline,
        )
        then = "releasing the lease" if self.elector is not None else "stopping"
        backoff = 0.25
        for attempt in itertools.count(1):
            if await store.flush(timeout=max(deadline - time.monotonic(), FINAL_WRITE_LEAST)):
                if attempt > 1:
                    log.info(
                        "checkpoint ConfigMap %s/%s written at the stop's attempt %d; %s",
                        store.namespace,
                        store.name,
                        attempt,
                        then,
                    )
                return True
            failure = store.last_failure
            if not _worth_retrying(failure):
                why = "not worth retrying"
                break
            if self.elector is not None and not self.elector.is_leader:
                why = "the lease is lost: the next leader writes it"
                break
            wait = backoff
            if isinstance(failure, ApiError) and failure.retry_after is not None:
                wait = failure.retry_after
            backoff = min(backoff * 2, 2.0)
            left = deadline - time.monotonic()
            if wait >= left:
                why = f"no time left: {max(left, 0):.1f}s of the grace period"
                break
            log.warning(
                "checkpoint ConfigMap %s/%s: the stop's write failed (%s); trying again in %.2fs, %.1fs left "
                "before %s",
                store.namespace,
                store.name,
                failure_text(failure) if failure is not None else "unknown",
                wait,
                left,
                then,
            )
            await asyncio.sleep(wait)
        log.error(
            "checkpoint ConfigMap %s/%s not written at the stop after %d attempts (%s); %s: %s delivers again "
            "what was accepted since its previous write",
            store.namespace,
            store.name,
            attempt,
            why,
            then,
            "the next leader" if self.elector is not None else "the next start",
        )
        return False

    def _say_left(self, p: Pipeline, written: int, scan_until: float) -> None:
        """At a stop, once the leftovers are in the spool: what it holds. With a checkpoint file the
        next start reads both (``_say_kept``). A ConfigMap checkpoint is read by the next leader,
        which has a spool of its own (the chart's data dir is an emptyDir): its relist sends each
        event the API server still holds at its newest count, and the other records (of events
        expired or deleted while their sink failed, older occurrences of a live event) are in this
        data dir only: said at ERROR, not counted as dropped (this replica again on the same data
        dir delivers them)."""
        spool = p.spool
        if spool is None:
            return
        if self.checkpoint_store is None:
            _say_kept(p, written)
            return
        parked = spool.parked_count
        total = len(spool) + parked
        if not (written or total):
            return
        expected: list[str | None] = [*self.settings.namespaces] or [None]
        # The trackers are a complete picture of what the API server holds once every namespace
        # listed and while no relist is under way (one cut short forgets what it had not handed on).
        knows = (
            bool(self.watchers)
            and all(ns in self._listed_namespaces for ns in expected)
            and not any(w.listing for w in self.watchers)
        )
        highest: dict[str, int] = {}
        if knows:
            highest = (
                self.watchers[0].tracker.seen
                if len(self.watchers) == 1
                else {uid: n for w in self.watchers for uid, n in w.tracker.seen.items()}
            )
        sent = older = gone = unreadable = 0
        gone_events: set[str] = set()
        for uid, number in spool.unread_keys(scan_until) if knows else ():
            if not uid:
                unreadable += 1
            elif (top := highest.get(uid)) is None:
                gone += 1
                gone_events.add(uid)
            elif number < top:
                older += 1
            else:
                sent += 1
        log.info(
            "sink %s: %d undelivered occurrences left in this replica's spool (%d written at this stop, %d "
            "parked: set aside for a key the sink refused); the next leader reads the checkpoint ConfigMap, "
            "not this spool: %s",
            p.name,
            total,
            written,
            parked,
            f"{sent} of them are of events the API server still holds: the next leader's relist sends them"
            if knows
            else "its relist sends again what the API server still holds",
        )
        advice = (
            "delivered if this replica leads again on the same data dir (a container restart keeps an "
            "emptyDir, a replacement pod mounts its claim again with the chart's persistence.perReplica); "
            "lost if the data dir is deleted (an emptyDir when its pod is replaced). Keep the sink "
            "reachable before a rollout, or give each replica a claim (persistence.perReplica)"
        )
        if gone or older:
            why = []
            if gone:
                why.append(
                    f"{gone} of {len(gone_events)} events it no longer holds: expired or deleted while undelivered"
                )
            if older:
                why.append(
                    f"{older} older occurrences of events it holds at a newer count: the relist sends that one only"
                )
            log.error(
                "sink %s: %d undelivered occurrences not retained by the API server (%s), kept only in %s: %s",
                p.name,
                gone + older,
                "; ".join(why),
                self.settings.data_dir,
                advice,
            )
        unknown = total - sent - older - gone
        if unknown > 0:
            why = [] if knows else ["the watch had not completed its list"]
            # Not given by the scan: in segments it could not read (named in an ERROR), or past its time.
            segments, held = spool.scan_failed()
            failed = min(held, unknown - unreadable) if knows else 0
            if failed:
                why.append(f"{failed} in {segments} segments that could not be read (see the ERROR above)")
            if knows and unknown > unreadable + failed:
                why.append(
                    f"{unknown - unreadable - failed} not read: a stop reads the spools for "
                    f"{STOP_SCAN_SECONDS:g}s at most"
                )
            if unreadable:
                why.append(f"{unreadable} not readable")
            log.warning(
                "sink %s: %d undelivered occurrences not checked against the events the API server holds (%s): "
                "those of events it no longer holds are kept only in %s: %s",
                p.name,
                unknown,
                "; ".join(why),
                self.settings.data_dir,
                advice,
            )

    @contextlib.asynccontextmanager
    async def running(self, kube: KubeClient | None = None, *, watch: bool = True) -> AsyncIterator[Router]:
        """Start pipelines (and the watch), yield, then stop gracefully."""
        await self.start_pipelines()
        try:
            if watch:
                await self.start_source(kube)
            yield self
        finally:
            if not self.stopped.is_set():
                await self.stop()


def _worth_retrying(failure: BaseException | None) -> bool:
    """A write refused for a while (409 after the store's merges, 429, 5xx), timed out or cut off, not
    one refused for what it is (403 RBAC, 422 too large): trying again may succeed."""
    if isinstance(failure, ApiError):
        return failure.status in (409, 429) or failure.status >= 500
    return isinstance(failure, aiohttp.ClientError | OSError | TimeoutError)


def _numbers_rising(chunks: Iterable[list[Occurrence]]) -> Iterator[list[Occurrence]]:
    """Chunks in time order with the occurrences of one time in number order: (uid, 5) and (uid, 3)
    written in the same second stay in file order in a stable sort by time, and 3 handed on after 5
    was accepted is skipped as a copy. The last time of a chunk waits for the next chunk."""
    tail: list[Occurrence] = []
    for chunk in chunks:
        run = tail + chunk
        if not run:
            continue
        last = run[-1].time_ns
        cut = len(run)
        while cut and run[cut - 1].time_ns == last:
            cut -= 1
        tail = run[cut:]
        if cut:
            yield sorted(run[:cut], key=_time_then_number)
    if tail:
        yield sorted(tail, key=_time_then_number)


def _time_then_number(occ: Occurrence) -> tuple[int, int]:
    return occ.time_ns, occ.number


def _say_kept(p: Pipeline, written: int) -> None:
    """At a stop: what the spool keeps for the next start, all of it (the main FIFO's backlog and
    the parked FIFO's records, which ``len`` leaves out), the parked ones said apart: they wait for a
    key the sink refused. Said whenever this stop wrote to it or it holds anything."""
    spool = p.spool
    if spool is None:
        return
    parked = spool.parked_count
    total = len(spool) + parked
    if not (written or total):
        return
    log.info(
        "sink %s: %d undelivered occurrences kept in the spool for the next start (%d written at this "
        "stop, %d parked: set aside for a key the sink refused)",
        p.name,
        total,
        written,
        parked,
    )
