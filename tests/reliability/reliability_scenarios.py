"""The fault scenarios, parameterised by duration and size: the suite runs them short
(tests/reliability/test_*.py), ``bench/reliability.py`` runs them long. Each returns a Report with
one Account per sink; the callers assert (tests) or print (bench)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
from reliability_harness import (
    Key,
    Ledger,
    Load,
    Report,
    RouterProcess,
    file_keys,
    free_port,
    loki_keys,
    metric,
    webhook_keys,
)

from eventrouter.app import Router, RouterSettings
from eventrouter.config import SinkSpec, build_specs, spec_for_class
from eventrouter.source.watcher import WatchSettings
from eventrouter.testing import MemorySink, event_object
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.hostile import MIB, hostile_objects
from eventrouter.testing.receivers.loki import LokiReceiver
from eventrouter.testing.receivers.webhook import WebhookReceiver
from eventrouter.testing.waiting import until

FAST_RETRY = "retry_initial_backoff=0.1&retry_max_backoff=1"


# ---- in-process router ----------------------------------------------------------------------------


def settings_for(api: FakeApiServer | HostileApiServer, tmp: Path, **kw: Any) -> RouterSettings:
    tmp.mkdir(parents=True, exist_ok=True)
    return RouterSettings(
        cluster_name="rel",
        kubeconfig=api.kubeconfig(tmp / "kubeconfig"),
        metrics_addr=kw.pop("metrics_addr", None),
        shutdown_timeout=kw.pop("shutdown_timeout", 10.0),
        stall_timeout=kw.pop("stall_timeout", 600.0),
        watch=WatchSettings(
            watch_timeout=kw.pop("watch_timeout", 30),
            backoff_initial=0.05,
            backoff_max=kw.pop("backoff_max", 0.5),
        ),
        **kw,
    )


def memory_spec(name: str = "mem", **opts: Any) -> SinkSpec:
    return spec_for_class(MemorySink, {"name": name, "batch_max_wait": 0.02, **opts}, type_="memory")


def memory_keys(router: Router, name: str = "mem") -> list[tuple[str, int]]:
    sink = router.sinks[name]
    assert isinstance(sink, MemorySink)
    return sink.keys


async def settle(router: Router, timeout: float = 30) -> None:
    """Every pipeline has sent what it was offered (nothing queued, spooled or in flight)."""
    await asyncio.gather(*(p.wait_idle(timeout) for p in router.pipelines))


@contextlib.asynccontextmanager
async def api_server(bookmark_interval: float = 0.2, **kw: Any) -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(token="rel-token", **kw) as api:
        api.bookmark_interval = bookmark_interval
        yield api


# ---- 1. sink outages: 500 for a while, 429 + Retry-After, accepted connection that never answers ----


async def sink_outage(tmp: Path, mode: str, *, outage: float = 5.0, rate: float = 100.0) -> Report:
    """The webhook sink fails (``mode`` = ``500`` | ``429`` | ``hang``) while events keep coming; a
    file sink in the same router stays healthy. Nothing is lost, nothing duplicated, and the healthy
    sink is not held up by the broken one."""
    out = tmp / "file.jsonl"
    facts: dict[str, Any] = {"mode": mode}
    # Timeouts are the "hang" scenario; in the others a 1 s timeout only measured the machine: the
    # receiver shares the test's event loop, and one stall of a second in a late, large test process
    # timed out a send the receiver had taken (8 duplicates, correctly re-sent).
    send_timeout = 1 if mode == "hang" else 10
    async with api_server() as api, WebhookReceiver() as hook:
        specs = build_specs(
            [
                f"webhook:{hook.url}?batch_max_events=50&batch_max_wait=0.05&send_timeout={send_timeout}&{FAST_RETRY}",
                f"file:{out}?batch_max_wait=0.05",
            ]
        )
        router = Router(settings_for(api, tmp), specs)
        ledger = Ledger(api)
        load = Load(ledger, rate=rate)
        async with router.running():
            await until(lambda: router.ready()[0])
            load.start()
            await until(lambda: len(webhook_keys(hook)) >= 20)
            started = time.monotonic()
            if mode == "500":
                hook.fail_next(100_000, 500, body=b"upstream unavailable")
                await asyncio.sleep(outage)  # the outage itself: load keeps running meanwhile
                # While the webhook is still down, the file sink has everything produced so far.
                load.paused = True
                await until(lambda: ledger.complete(file_keys(out)), timeout=30)
                facts["file_complete_during_outage"] = True
                hook._faults.clear()  # the receiver has no public "recover now" call
                load.paused = False
            elif mode == "429":
                n = max(1, round(outage / 2))
                hook.fail_next(n, 429, retry_after="2")
                await until(lambda: sum(r.status == 429 for r in hook.requests) >= n, timeout=outage * 4 + 10)
            elif mode == "hang":
                n = max(1, round(outage))
                hook.hang_next(n)
                await until(lambda: not hook._faults, timeout=outage * 6 + 10)
                ok_before = len(hook.accepted)
                await until(lambda: len(hook.accepted) > ok_before, timeout=30)
            else:
                raise ValueError(mode)
            facts["outage_s"] = round(time.monotonic() - started, 1)
            await asyncio.sleep(0.5)  # keep producing for a moment after recovery
            await load.stop()
            await until(lambda: ledger.complete(webhook_keys(hook)), timeout=60)
            await settle(router)
            facts["send_errors_timeout"] = router.metrics.send_errors.labels(
                "webhook", "timeout"
            )._value.get()
            facts["retries"] = router.metrics.retries.labels("webhook")._value.get()
        statuses = [r.status for r in hook.requests]
        facts["requests"] = len(statuses)
        facts["failed_requests"] = sum(1 for s in statuses if s is None or s >= 400)
        if mode == "429":
            # The retry after each 429 waited at least Retry-After (2 s).
            gaps = [
                hook.requests[i + 1].arrived - r.arrived
                for i, r in enumerate(hook.requests[:-1])
                if r.status == 429
            ]
            facts["min_gap_after_429_s"] = round(min(gaps), 2)
        return Report(
            f"sink {mode}",
            [ledger.account("webhook", webhook_keys(hook)), ledger.account("file", file_keys(out))],
            facts,
        )


# ---- 2. disk spool: sink down longer than the memory queue, router restarted mid-outage -------------


async def disk_spool(
    tmp: Path, restart: str, *, first: int = 300, queue: int = 50, batch: int = 20, deleted: int = 60
) -> Report:
    """Issue 6. The webhook destination is down (nothing listens on its port) for longer than its
    memory queue (``queue``) holds: occurrences spill to the disk spool under --data-dir. The router
    is restarted twice during the outage (``restart`` = ``sigterm`` | ``sigkill``); meanwhile some
    events are *deleted* from the API server, so no relist can bring them back: if they arrive, they
    came from the spool. Then the destination comes up and everything is delivered."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/hook"
    out = tmp / "file.jsonl"
    sinks = [
        f"webhook:{url}?queue_max_events={queue}&batch_max_events={batch}&batch_max_wait=0.05"
        f"&send_timeout=2&{FAST_RETRY}",
        f"file:{out}?batch_max_events={batch}&batch_max_wait=0.05",  # same in-flight window as the webhook
    ]
    facts: dict[str, Any] = {"restart": restart, "queue_max_events": queue, "batch_max_events": batch}
    sig = signal.SIGTERM if restart == "sigterm" else signal.SIGKILL
    async with api_server() as api, RouterProcess(api, tmp, sinks).managed() as router:
        ledger = Ledger(api)
        ledger.observing = False  # restarts: repeats raised while down fold into one record
        spool_dir = router.data / "spool" / "webhook"

        async def observed(n: int) -> None:
            await router.wait_metric("eventrouter_occurrences_total", n, timeout=60)

        # Router 1: the destination is down; `first` events arrive, most spill to disk.
        await router.start()
        await router.wait_serving()
        uids = [ledger.create(event_object(object_name=f"sp-{i}"))["metadata"]["uid"] for i in range(first)]
        await observed(first)
        samples = await router.metrics()
        facts["spool_depth_1"] = metric(samples, "eventrouter_sink_spool_depth", sink="webhook")
        assert facts["spool_depth_1"] > 0, "the memory queue did not spill"
        facts["exit_1"] = await router.signal(sig)
        # While the router is down: delete events whose only copy is now on disk, add and repeat others.
        # After SIGTERM the drained memory queue went to the spool too, so every event is on disk;
        # after SIGKILL what sat in the memory queue is gone (by design it comes back by relist only
        # while the API server holds it), so only events found in the spool files are deleted.
        on_disk = spooled_uids(spool_dir)
        facts["spooled_after_1"] = len(on_disk)
        if restart == "sigterm":
            assert on_disk == set(uids), "a clean stop keeps every undelivered occurrence in the spool"
        victims = random.Random(7).sample(sorted(on_disk), deleted)
        for uid in victims:
            ledger.delete(uid)
        for i in range(50):
            ledger.create(event_object(object_name=f"sp2-{i}"))
        for uid in ledger.live[:40]:
            ledger.bump(uid)
        # Router 2, still no destination: relists, spills more; restarted again mid-outage.
        await router.start()
        await observed(len(ledger.live))
        for i in range(50):
            ledger.create(event_object(object_name=f"sp3-{i}"))
        await observed(len(ledger.live))
        facts["spool_files"] = len(list(spool_dir.glob("*.seg")))
        facts["exit_2"] = await router.signal(sig)
        # Router 3; the destination comes up while it retries.
        await router.start()
        await observed(len(ledger.live))
        async with WebhookReceiver(port=port) as hook:
            with contextlib.suppress(TimeoutError):  # reported as lost below
                await until(lambda: ledger.complete(webhook_keys(hook)), timeout=60, interval=0.1)
                await until(lambda: ledger.complete(file_keys(out)), timeout=30, interval=0.1)
            facts["exit_3"] = await router.term()
            samples_text = router.log.read_text()
            facts["spool_full_drops"] = samples_text.count("spool full")
            keys = webhook_keys(hook)
        got = set(keys)
        facts["deleted_events_delivered"] = sum(1 for uid in victims if (uid, 1) in got)
        facts["deleted_events"] = len(victims)
        # The healthy file sink has no spool (its queue never fills): after a SIGKILL, what it had not
        # written yet of the deleted events is gone with the process, as the guarantee allows.
        exempt = set(victims) if restart == "sigkill" else set()
        return Report(
            f"disk spool, {restart} restarts",
            [ledger.account("webhook", keys), ledger.account("file", file_keys(out), exempt=exempt)],
            facts,
        )


async def data_disk_full(tmp: Path, *, before: int = 20, during: int = 60, bumps: int = 15) -> Report:
    """The data dir's volume fills up under a running router (its file size limit, ``RLIMIT_FSIZE``,
    lowered to 0 from outside: every write to a file fails, as on a full disk) while events, repeats
    and deletions keep coming to a webhook and a Loki sink. The router keeps delivering everything;
    once the volume has room again it makes its checkpoints durable, and after a SIGKILL and a
    restart nothing is delivered twice."""
    import resource

    facts: dict[str, Any] = {}
    async with (
        api_server() as api,
        WebhookReceiver() as hook,
        LokiReceiver() as loki,
    ):
        sinks = [
            f"webhook:{hook.url}?batch_max_events=20&batch_max_wait=0.05&{FAST_RETRY}",
            f"loki:{loki.url}?batch_max_events=20&batch_max_wait=0.05&{FAST_RETRY}",
        ]
        async with RouterProcess(api, tmp, sinks).managed() as router:
            ledger = Ledger(api)

            def complete() -> bool:
                return ledger.complete(webhook_keys(hook)) and ledger.complete(loki_keys(loki))

            await router.start()
            await router.wait_serving()
            for i in range(before):
                ledger.create(event_object(object_name=f"full-a-{i}"))
            await until(complete, timeout=60, interval=0.1)
            assert router.proc is not None
            _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.prlimit(router.proc.pid, resource.RLIMIT_FSIZE, (0, hard))  # the disk is full
            for i in range(during):
                ledger.create(event_object(object_name=f"full-b-{i}"))
            for uid in ledger.live[:bumps]:
                ledger.bump(uid)
            for uid in ledger.live[-5:]:
                ledger.delete(uid)  # the watch forgets their checkpoint entries: more writes that fail
            await until(complete, timeout=60, interval=0.1)
            assert router.proc.returncode is None, "the router stopped with its disk full"
            facts["checkpoint_errors_while_full"] = await router.per_sink(
                "eventrouter_data_dir_errors", file="checkpoint"
            )
            facts["durable_while_full"] = await router.per_sink("eventrouter_checkpoint_durable")
            port = await router.wait_serving()
            async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                facts["readyz_while_full"] = resp.status
            resource.prlimit(router.proc.pid, resource.RLIMIT_FSIZE, (hard, hard))  # room again
            started = time.monotonic()
            await router.wait_per_sink("eventrouter_checkpoint_durable", [1.0, 1.0], timeout=30)
            facts["durable_again_after_s"] = round(time.monotonic() - started, 1)
            # A SIGKILL, not a clean stop: what the restart skips is what the retried snapshot holds.
            facts["exit_kill"] = await router.kill()
            await router.start()
            await router.wait_serving()
            for i in range(5):
                ledger.create(event_object(object_name=f"full-c-{i}"))
            await until(complete, timeout=60, interval=0.1)
            facts["exit_term"] = await router.term()
        return Report(
            "data disk full",
            [ledger.account("webhook", webhook_keys(hook)), ledger.account("loki", loki_keys(loki))],
            facts,
        )


async def credentials_rotated(tmp: Path, *, before: int = 20, rate: float = 50.0, after: int = 10) -> Report:
    """Credentials rotated under load, the way a cluster does it: Loki's bearer token changes at
    Loki first, and the webhook's server certificate is re-issued by a new CA, so both sinks are
    refused (401, and a certificate that no longer verifies). Then the kubelet brings the new
    Secret into the pod (an atomic swap of the volume's ``..data``). The router picks the new token
    and CA bundle up without a restart and delivers everything, dead-lettering nothing; a restart
    afterwards starts on the new files and delivers nothing twice."""
    from eventrouter.testing.secret_volume import SecretVolume
    from eventrouter.testing.tls import certificate, server_context

    facts: dict[str, Any] = {}
    old_cert, old_key = await asyncio.to_thread(certificate, tmp, name="ca-old")
    new_cert, new_key = await asyncio.to_thread(certificate, tmp, name="ca-new")
    volume = SecretVolume(tmp / "secrets", {"loki-token": "token-old", "ca.crt": old_cert.read_bytes()})
    port = free_port()
    hooks = [WebhookReceiver(port=port, ssl_context=server_context(old_cert, old_key))]
    async with api_server() as api, LokiReceiver(bearer_token="token-old") as loki:
        await hooks[0].__aenter__()
        try:
            sinks = [
                f"loki:{loki.url}?bearer_token=file:{volume.file('loki-token')}"
                f"&batch_max_events=20&batch_max_wait=0.05&{FAST_RETRY}",
                f"webhook:https://127.0.0.1:{port}/hook?ca_file={volume.file('ca.crt')}"
                f"&batch_max_events=20&batch_max_wait=0.05&{FAST_RETRY}",
            ]
            async with RouterProcess(api, tmp, sinks).managed() as router:
                ledger = Ledger(api)

                def hook_keys() -> list[Key]:
                    return [k for h in hooks for k in webhook_keys(h)]

                def complete() -> bool:
                    return ledger.complete(loki_keys(loki)) and ledger.complete(hook_keys())

                await router.start()
                await router.wait_serving()
                for i in range(before):
                    ledger.create(event_object(object_name=f"rot-a-{i}"))
                await until(complete, timeout=60, interval=0.1)
                load = Load(ledger, rate=rate, prefix="rot-b")
                load.start()
                # The rotation at the destinations: both sinks are refused from now on.
                loki.bearer_token = "token-new"
                await hooks[0].__aexit__(None, None, None)  # ends kept-alive TLS connections too
                hooks.append(WebhookReceiver(port=port, ssl_context=server_context(new_cert, new_key)))
                await hooks[1].__aenter__()
                await router.wait_per_sink("eventrouter_sink_up", [0.0, 0.0])
                facts["loki_401"] = sum(1 for p in loki.pushes if p.status == 401)
                facts["made_before_the_new_secret"] = load.made
                # The kubelet's update of the Secret volume.
                volume.update({"loki-token": "token-new", "ca.crt": new_cert.read_bytes()})
                swapped = time.monotonic()
                # The load goes on until both sinks were rebuilt, and a second after that.
                await router.wait_per_sink("eventrouter_sink_reloads", [1.0, 1.0], result="applied")
                facts["rebuilt_after_s"] = round(time.monotonic() - swapped, 1)
                facts["made_while_refused"] = load.made - facts["made_before_the_new_secret"]
                made = load.made
                await until(lambda: load.made >= made + rate, timeout=30)
                await load.stop()
                await until(complete, timeout=60, interval=0.1)
                facts["delivered_all_after_s"] = round(time.monotonic() - swapped, 1)
                facts["reloads_applied"] = await router.per_sink("eventrouter_sink_reloads", result="applied")
                facts["reloads_invalid"] = await router.per_sink("eventrouter_sink_reloads", result="invalid")
                facts["dead_lettered"] = [
                    a + b
                    for a, b in zip(
                        await router.per_sink("eventrouter_sink_dead_lettered", reason="rejected"),
                        await router.per_sink("eventrouter_sink_dead_lettered", reason="retries_exhausted"),
                        strict=True,
                    )
                ]
                facts["exit_term"] = await router.term()
                # A restart reads the new files at start: nothing twice, the rest delivered.
                await router.start()
                await router.wait_serving()
                for i in range(after):
                    ledger.create(event_object(object_name=f"rot-c-{i}"))
                await until(complete, timeout=60, interval=0.1)
                facts["exit_term_after_restart"] = await router.term()
                log = router.log.read_text(errors="replace")
                facts["secrets_in_log"] = sum(log.count(t) for t in ("token-old", "token-new"))
        finally:
            await hooks[-1].__aexit__(None, None, None)
    return Report(
        "credentials rotated",
        [ledger.account("loki", loki_keys(loki)), ledger.account("webhook", hook_keys())],
        facts,
    )


def spooled_uids(spool_dir: Path) -> set[str]:
    """Event uids with an occurrence in the spool's segment files (read from disk, not from the router)."""
    import orjson

    uids: set[str] = set()
    for seg in spool_dir.glob("*.seg"):
        for line in seg.read_bytes().splitlines():
            uids.add(orjson.loads(line)[0]["metadata"]["uid"])  # [raw, received_at] or [..., owed]
    return uids


# ---- 3. SIGKILL storm under load --------------------------------------------------------------------


async def kill_storm(
    tmp: Path, *, kills: int = 10, rate: float = 150.0, batch: int = 50, seed: int = 1
) -> Report:
    """The router process is SIGKILLed ``kills`` times at random moments while it delivers to two
    sinks under steady load. Lost must be 0; duplicates at most kills × batch_max_events per sink
    (one batch in flight per sink at any time)."""
    rnd = random.Random(seed)
    out = tmp / "file.jsonl"
    async with api_server(bookmark_interval=0.5) as api, WebhookReceiver() as hook:
        sinks = [
            f"webhook:{hook.url}?batch_max_events={batch}&batch_max_wait=0.05&{FAST_RETRY}",
            f"file:{out}?batch_max_events={batch}&batch_max_wait=0.05",
        ]
        async with RouterProcess(api, tmp, sinks).managed() as router:
            ledger = Ledger(api)
            ledger.observing = False
            load = Load(ledger, rate=rate, prefix="kl")
            load.start()
            delivered_between: list[int] = []
            started = time.monotonic()
            for _ in range(kills):
                before = len(webhook_keys(hook))
                await router.start()
                # Kill while it is delivering: after the first new receipt, at a random moment.
                await until(lambda b=before: len(webhook_keys(hook)) > b, timeout=60)  # type: ignore[misc]
                await asyncio.sleep(rnd.uniform(0.0, 1.5))
                assert await router.kill() == -signal.SIGKILL
                delivered_between.append(len(webhook_keys(hook)) - before)
            await load.stop()
            await router.start()
            await until(
                lambda: ledger.complete(webhook_keys(hook)) and ledger.complete(file_keys(out)), timeout=120
            )
            code = await router.term()
            assert code == 0, f"SIGTERM: exit {code}; router log:\n{router.tail()}"
            facts = {
                "kills": kills,
                "batch_max_events": batch,
                "dup_bound": kills * batch,
                "events": load.made,
                "seconds": round(time.monotonic() - started, 1),
                "min_delivered_between_kills": min(delivered_between),
            }
        return Report(
            "SIGKILL storm",
            [ledger.account("webhook", webhook_keys(hook)), ledger.account("file", file_keys(out))],
            facts,
        )


# ---- 4. source faults -------------------------------------------------------------------------------


async def watch_cuts(tmp: Path, *, cuts: int = 15, rate: float = 150.0) -> Report:
    """The watch stream is reset mid-object again and again while events flow. The router resumes
    from its last resourceVersion, so every occurrence (intermediate repeats included) is required."""
    async with api_server() as api:
        router = Router(settings_for(api, tmp), [memory_spec()])
        ledger = Ledger(api)
        load = Load(ledger, rate=rate, prefix="cut")
        async with router.running():
            await until(lambda: router.ready()[0])
            load.start()
            broken = router.metrics.watch_restarts.labels("connection")
            for i in range(cuts):
                await asyncio.sleep(0.2)
                api.faults.cut_next_watch(after_lines=i % 4, mid_object=True)
                api.disconnect_watches()
                # The reset reached the router (counted) before the next one is armed.
                await until(lambda n=i + 1: broken._value.get() >= n, timeout=10)  # type: ignore[misc]
            await load.stop()
            await until(lambda: ledger.complete(memory_keys(router)), timeout=30)
            await settle(router)
            facts = {
                "cuts": cuts,
                "mid_object_resets": api.faults.applied.count("cut"),
                "watch_restarts_connection": router.metrics.watch_restarts.labels("connection")._value.get(),
                "relists": router.metrics.relists.labels("expired")._value.get(),
            }
        return Report("watch cut mid-object", [ledger.account("mem", memory_keys(router))], facts)


async def apiserver_restart(
    tmp: Path, *, restarts: int = 2, down: float = 1.0, rate: float = 100.0
) -> Report:
    """The API server goes away (connections refused), comes back on the same address with the same
    objects and a newer revision (its watch cache starts empty: the router's resourceVersion is too
    old → 410 → relist), and answers the first requests with 500. Writes that happen during the
    restart fold into one record per event (relist); everything else is required."""
    api = FakeApiServer(token="rel-token")
    await api.start()
    api.bookmark_interval = 0.2
    port = int(api.url.rsplit(":", 1)[1])
    router = Router(settings_for(api, tmp), [memory_spec()])
    ledger = Ledger(api)
    load = Load(ledger, rate=rate, prefix="rs")
    facts: dict[str, Any] = {"restarts": restarts}
    try:
        async with router.running():
            await until(lambda: router.ready()[0])
            load.start()
            for _ in range(restarts):
                await asyncio.sleep(1.0)
                load.paused = True
                # The ledger requires every write made while observing; a server that goes away drops
                # the watch events it has not sent yet (the fake one clears its watch queues, as a
                # crashed API server does), and the relist then shows only the newest count, which
                # the ledger could not tell from a loss. So the router first has what was sent.
                # (Without this wait: lost=1 in two full-suite runs, sessions 4 and 5.)
                await until(lambda: ledger.complete(memory_keys(router)), timeout=30)
                old = api
                await old.close()
                ledger.observing = False
                new = FakeApiServer(token="rel-token", port=port)
                new.bookmark_interval = 0.2
                for obj in old.events():
                    new.create_event(obj)
                # etcd keeps its revision across an API server restart: move past the old one.
                while new.resource_version <= old.resource_version + 10:
                    filler = new.create_event(event_object(object_name="filler"))
                    new.delete_event(filler["metadata"]["namespace"], filler["metadata"]["name"])
                new.compact()
                api = ledger.api = new
                # Writes accepted while the router cannot reach the server (it is "restarting").
                load.paused = False
                await asyncio.sleep(down)
                new.faults.fail_next(500, count=3, verbs=("list",))
                restarted_at = new.resource_version
                await new.start()
                await until(
                    lambda r=restarted_at: int(router.watchers[0].resource_version or 0) >= r,  # type: ignore[misc]
                    timeout=30,
                )
                ledger.observing = True
            await asyncio.sleep(1.0)
            await load.stop()
            try:
                await until(lambda: ledger.complete(memory_keys(router)), timeout=30)
            except TimeoutError:
                # Say what is missing and where the watch is.
                w = router.watchers[0]
                raise AssertionError(
                    f"{ledger.account('mem', memory_keys(router))}; watcher rv={w.resource_version} "
                    f"api rv={api.resource_version} tracked={len(w.tracker)} "
                    f"active watches={api.active_watches}"
                ) from None
            await settle(router)
            facts["relists_expired"] = router.metrics.relists.labels("expired")._value.get()
            facts["watch_restarts_http_500"] = router.metrics.watch_restarts.labels("http_500")._value.get()
    finally:
        await api.close()
    return Report("API server restarted", [ledger.account("mem", memory_keys(router))], facts)


async def gone_storm(tmp: Path, *, duration: float = 5.0, rate: float = 150.0) -> Report:
    """410 Gone storm: the history is compacted every 100 ms and watches are cut, so every reconnect
    is answered 410 and the router relists again and again while events flow."""
    async with api_server() as api:
        router = Router(settings_for(api, tmp), [memory_spec()])
        ledger = Ledger(api)
        load = Load(ledger, rate=rate, prefix="gone")
        async with router.running():
            await until(lambda: router.ready()[0])
            load.start()
            ledger.observing = False
            end = time.monotonic() + duration
            i = 0
            while time.monotonic() < end:
                # Cut the stream, write while the router reconnects, forget the history: the router's
                # resourceVersion is now too old and the reconnect is answered 410 Gone.
                api.disconnect_watches()
                for _ in range(3):
                    load.one()
                api.compact()
                i += 1
                await asyncio.sleep(0.15)
            load.paused = True
            await until(lambda: ledger.complete(memory_keys(router)), timeout=30)
            # The storm is over and the router caught up: from now on every repeat is required.
            await until(lambda: api.active_watches >= 1, timeout=10)
            ledger.observing = True
            load.paused = False
            await asyncio.sleep(1.0)
            await load.stop()
            await until(lambda: ledger.complete(memory_keys(router)), timeout=30)
            await settle(router)
            facts = {
                "compactions": i,
                "relists_expired": router.metrics.relists.labels("expired")._value.get(),
                "watch_restarts_expired": router.metrics.watch_restarts.labels("expired")._value.get(),
            }
        return Report("410 Gone storm", [ledger.account("mem", memory_keys(router))], facts)


async def bookmarks_only(tmp: Path, *, duration: float = 20.0) -> Report:
    """Nothing happens for ``duration`` seconds but bookmarks (and server-side watch timeouts every
    2 s). /healthz must answer 200 throughout (its stall timeout is 2 s) and nothing is re-delivered;
    an event after the quiet period is delivered at once."""
    async with api_server(bookmark_interval=0.5) as api:
        settings = settings_for(
            api,
            tmp,
            metrics_addr="127.0.0.1:0",
            stall_timeout=2.0,
            watch_timeout=2,
            allow_short_stall_timeout=True,
        )
        router = Router(settings, [memory_spec()])
        ledger = Ledger(api)
        async with router.running(), aiohttp.ClientSession() as http:
            await until(lambda: router.ready()[0])
            for i in range(50):
                ledger.create(event_object(object_name=f"bm-{i}"))
            await until(lambda: ledger.complete(memory_keys(router)), timeout=30)
            probes = unhealthy = 0
            end = time.monotonic() + duration
            while time.monotonic() < end:
                async with http.get(f"http://127.0.0.1:{router.http_port}/healthz") as r:
                    probes += 1
                    unhealthy += r.status != 200
                await asyncio.sleep(0.25)
            received_quiet = len(memory_keys(router))
            ledger.create(event_object(object_name="after-quiet"))
            await until(lambda: ledger.complete(memory_keys(router)), timeout=10)
            await settle(router)
            facts = {
                "quiet_s": duration,
                "healthz_probes": probes,
                "healthz_failures": unhealthy,
                "bookmarks": router.metrics.watch_events.labels("BOOKMARK")._value.get(),
                "watch_reopens": router.metrics.watch_restarts.labels("timeout")._value.get(),
                "received_during_quiet": received_quiet - 50,
            }
        return Report("bookmarks only", [ledger.account("mem", memory_keys(router))], facts)


async def etcd_quiet(tmp: Path, *, spells: int = 3, compaction: float = 0.5) -> Report:
    """Events as kube-apiserver 1.24 serves them by default: straight from etcd, so no bookmarks, and
    etcd's compactor forgets the history (every ``compaction`` s here, 5 min in a cluster). Bursts of
    new events and repeats alternate with quiet spells in which only other writes move the revision
    (as node leases do); each spell lasts until the router's next watch was answered 410 and it
    relisted. Nothing lost, nothing delivered twice, /healthz 200 throughout (stall timeout 2 s)."""
    async with FakeApiServer(token="rel-token", watch_cache=False, compaction_interval=compaction) as api:
        settings = settings_for(
            api,
            tmp,
            metrics_addr="127.0.0.1:0",
            stall_timeout=2.0,
            watch_timeout=1,
            allow_short_stall_timeout=True,
        )
        router = Router(settings, [memory_spec()])
        ledger = Ledger(api)
        expired = router.metrics.relists.labels("expired")
        async with router.running(), aiohttp.ClientSession() as http:
            await until(lambda: router.ready()[0])
            healthz = f"http://127.0.0.1:{router.http_port}/healthz"
            probes = unhealthy = leases = 0
            started = time.monotonic()
            for spell in range(spells):
                for i in range(20):
                    ledger.create(event_object(object_name=f"etcd-{spell}-{i}"))
                for uid in ledger.live[:5]:  # repeats of events listed again by every relist
                    ledger.bump(uid)
                await until(lambda: ledger.complete(memory_keys(router)), timeout=30)
                relisted = expired._value.get()
                async with asyncio.timeout(60):
                    while expired._value.get() <= relisted:
                        # A lease renewal every 100 ms: the revision moves, the Events do not.
                        lease = {"metadata": {"name": f"node-{spell}-{leases}", "namespace": "default"}}
                        api.create_object("configmaps", lease)
                        leases += 1
                        async with http.get(healthz) as r:
                            probes += 1
                            unhealthy += r.status != 200
                        await asyncio.sleep(0.1)
            await until(lambda: ledger.complete(memory_keys(router)), timeout=30)
            await settle(router)
            facts = {
                "spells": spells,
                "seconds": round(time.monotonic() - started, 1),
                "relists_expired": expired._value.get(),
                "bookmarks": router.metrics.watch_events.labels("BOOKMARK")._value.get(),
                "other_writes": leases,
                "healthz_probes": probes,
                "healthz_failures": unhealthy,
            }
        return Report(
            "no watch cache, quiet past compaction", [ledger.account("mem", memory_keys(router))], facts
        )


# ---- 5. cardinality ---------------------------------------------------------------------------------


async def cardinality(tmp: Path, *, objects: int = 20_000, chunk: int = 500) -> Report:
    """``objects`` distinct involved objects (one event each) into a memory sink and Loki with its
    default labels: every one delivered, and Loki's stream count stays bounded by the label set."""
    async with api_server() as api, LokiReceiver() as loki:
        specs = [memory_spec(), *build_specs([f"loki:{loki.url}?batch_max_events=1000&batch_max_wait=0.05"])]
        # A burst larger than the memory queue (10,000): with --data-dir the excess spills to disk.
        router = Router(settings_for(api, tmp, data_dir=tmp / "data"), specs)
        ledger = Ledger(api)
        started = time.monotonic()
        async with router.running():
            await until(lambda: router.ready()[0])
            for i in range(objects):
                ledger.create(
                    event_object(
                        namespace=f"ns-{i % 50}",
                        kind=("Pod", "Job", "Deployment", "Node")[i % 4],
                        object_name=f"obj-{i}-{i * 2654435761 % 1_000_003:x}",
                        reason=("BackOff", "Pulled", "Scheduled", "FailedMount")[i % 4],
                    )
                )
                if i % chunk == chunk - 1:
                    await asyncio.sleep(0)  # let the watch stream drain, as a real cluster would pace it
            await until(lambda: ledger.complete(memory_keys(router)), timeout=120, interval=0.1)
            await until(lambda: len(loki.entries) >= objects, timeout=120, interval=0.1)
            await settle(router)
            facts = {
                "objects": objects,
                "seconds": round(time.monotonic() - started, 1),
                "tracked_events": len(router.watchers[0].tracker),
                "loki_streams": len({e.labels for e in loki.entries}),
                "malformed": router.metrics.source_dropped.labels("malformed")._value.get(),
                "spooled_peak": "yes" if any((tmp / "data" / "spool").rglob("cursor")) else "no",
            }
        return Report(
            "cardinality",
            [ledger.account("mem", memory_keys(router)), ledger.account("loki", loki_keys(loki))],
            facts,
        )


def summary(reports: Sequence[Report]) -> str:
    return "\n".join(str(r) for r in reports)


# ---- 6. malformed and hostile input -----------------------------------------------------------------


def deadletter_keys(path: Path) -> list[tuple[str, int]]:
    import json

    if not path.exists():
        return []
    keys = []
    for line in path.read_bytes().splitlines():
        uid, _, n = json.loads(line)["key"].rpartition("/")
        keys.append((uid, int(n)))
    return keys


async def hostile_api_objects(tmp: Path) -> Report:
    """Every hostile object goes through webhook, Loki (with a label template over an unbounded,
    badly formed label), file and memory sinks: each is delivered or rejected with a reason to the
    dead-letter file (counted); the router keeps running and delivers a normal event afterwards."""
    out = tmp / "file.jsonl"
    data = tmp / "data"
    async with api_server() as api, WebhookReceiver() as hook, LokiReceiver() as loki:
        specs = [
            memory_spec(),
            *build_specs(
                [
                    f"webhook:{hook.url}?batch_max_wait=0.05&{FAST_RETRY}",
                    f"loki:{loki.url}?batch_max_wait=0.05&labels=app={{labels.app}},odd={{reason}}&{FAST_RETRY}",
                    f"file:{out}?batch_max_wait=0.05",
                ]
            ),
        ]
        router = Router(settings_for(api, tmp, data_dir=data), specs)
        ledger = Ledger(api)
        async with router.running():
            await until(lambda: router.ready()[0])
            for obj in hostile_objects():
                ledger.create(obj)
            for uid in ledger.live[:5]:
                ledger.bump(uid)  # bump() coerces odd counts the way a recorder would overwrite them
            ledger.create(event_object(object_name="after-hostile"))
            names = ("mem", "webhook", "loki", "file")

            def accounted() -> dict[str, list[tuple[str, int]]]:
                received = {
                    "mem": memory_keys(router),
                    "webhook": webhook_keys(hook),
                    "loki": loki_keys(loki),
                    "file": file_keys(out),
                }
                dead = {n: deadletter_keys(data / "deadletter" / f"{n}.jsonl") for n in names}
                return {n: received[n] + dead[n] for n in names}

            with contextlib.suppress(TimeoutError):
                await until(lambda: all(ledger.complete(keys) for keys in accounted().values()), timeout=30)
            await settle(router, timeout=5)
            final = accounted()
            facts: dict[str, Any] = {
                "objects": len(ledger.numbers),
                "malformed": router.metrics.source_dropped.labels("malformed")._value.get(),
                **{
                    f"dead_lettered_{n}": len(deadletter_keys(data / "deadletter" / f"{n}.jsonl"))
                    for n in names
                },
                "loki_truncated": sum(1 for e in loki.entries if '"truncated":true' in e.line),
                "loki_time_adjusted": len({e.line for e in loki.entries if '"time_adjusted":true' in e.line}),
                "loki_pushes_refused": sum(1 for p in loki.pushes if p.status >= 400),
            }
        # Rejected-with-a-reason counts as accounted for (not lost); both together must cover everything.
        accounts = [ledger.account(n, final[n]) for n in names]
        return Report("hostile objects", accounts, facts)


class HostileApiServer:
    """Serves one watch stream of raw bytes (invalid UTF-8, non-objects, 1 MiB lines, unknown types)
    after a list of raw bytes (empty by default): what a broken proxy or a buggy API server could
    send. The FakeApiServer cannot produce these because it stores (valid) JSON."""

    def __init__(self, lines: list[bytes], list_body: bytes | None = None) -> None:
        self.lines = lines
        self.list_body = list_body
        self.watches = 0
        self._closing = asyncio.Event()
        self._runner: Any = None
        self.url = ""

    async def __aenter__(self) -> HostileApiServer:
        from aiohttp import web

        async def events(request: web.Request) -> web.StreamResponse:
            if request.query.get("watch") != "true":
                if self.list_body is not None:
                    return web.Response(body=self.list_body, content_type="application/json")
                return web.json_response(
                    {
                        "kind": "EventList",
                        "apiVersion": "v1",
                        "metadata": {"resourceVersion": "1"},
                        "items": [],
                    }
                )
            self.watches += 1
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            if self.watches == 1:
                for line in self.lines:
                    await resp.write(line + b"\n")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), 30)
            return resp

        app = web.Application()
        app.router.add_get("/api/v1/events", events)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._closing.set()
        await self._runner.cleanup()

    def kubeconfig(self, path: Path) -> str:
        import yaml

        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "h", "cluster": {"server": self.url}}],
                    "users": [{"name": "h", "user": {"token": "t"}}],
                    "contexts": [{"name": "h", "context": {"cluster": "h", "user": "h"}}],
                    "current-context": "h",
                }
            )
        )
        return str(path)


def _hostile_event(uid: str, **extra: Any) -> dict[str, Any]:
    return event_object(uid=uid, object_name=uid, resource_version="2") | extra


# Broken Unicode spliced into JSON text (MARK is the placeholder replaced), and the message that each
# must be delivered with: U+FFFD per invalid byte or lone surrogate, as Go's decoder makes it.
BROKEN_UNICODE = [
    (b"caf\xe9 \xff\xfe \xc3\x28", "caf\ufffd \ufffd\ufffd \ufffd("),
    (b"\\ud800 alone", "\ufffd alone"),
    (b"low \\udc00 and a pair \\ud83d\\ude00", "low \ufffd and a pair \U0001f600"),
]


def hostile_list_page() -> tuple[bytes, dict[str, str]]:
    """An EventList page whose items carry broken Unicode, beside a clean one: (body, uid → message
    each must be delivered with). orjson refuses the whole page."""
    import orjson

    items = [_hostile_event("list-clean", message="clean")]
    want = {"list-clean": "clean"}
    for n, (_, fixed) in enumerate(BROKEN_UNICODE):
        items.append(_hostile_event(f"list-broken-{n}", message=f"MARK{n}"))
        want[f"list-broken-{n}"] = fixed
    # A key name broken too: the event is delivered, its message (under a broken key) is not found.
    items.append(_hostile_event("list-broken-key", message="KEYMARK"))
    want["list-broken-key"] = ""
    body = orjson.dumps(
        {"kind": "EventList", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": items}
    )
    for n, (raw, _) in enumerate(BROKEN_UNICODE):
        body = body.replace(f'"MARK{n}"'.encode(), b'"' + raw + b'"')
    body = body.replace(b'"message":"KEYMARK"', b'"mess\x80age":"KEYMARK"')
    return body, want


def hostile_lines() -> tuple[list[bytes], set[tuple[str, int]], dict[str, int], dict[str, str]]:
    """(lines, occurrences that must be delivered, source_dropped counts by reason, uid → message of
    the events whose broken Unicode must be repaired)."""
    import orjson

    ev = _hostile_event

    good = [ev(f"good-{i}") for i in range(5)]
    big = ev("big-1mib", message="B" * MIB)
    lines: list[bytes] = []
    want: set[tuple[str, int]] = set()
    dropped = {"malformed_line": 0, "malformed": 0, "unknown_watch_type": 0}

    def add(kind: str, obj: Any) -> None:
        lines.append(orjson.dumps({"type": kind, "object": obj}))

    add("ADDED", good[0])
    want.add(("good-0", 1))
    # Invalid UTF-8 inside a JSON string (raw bytes orjson refuses), lone surrogate escapes (valid
    # JSON text, not valid Unicode), and invalid UTF-8 in a key name: repaired, delivered.
    repaired: dict[str, str] = {}
    for n, (broken, fixed) in enumerate(BROKEN_UNICODE):
        raw = orjson.dumps({"type": "ADDED", "object": ev(f"bad-utf8-{n}", message="MARK")})
        lines.append(raw.replace(b'"MARK"', b'"' + broken + b'"'))
        want.add((f"bad-utf8-{n}", 1))
        repaired[f"bad-utf8-{n}"] = fixed
    raw = orjson.dumps({"type": "ADDED", "object": ev("bad-key", message="MARK")})
    lines.append(raw.replace(b'"message"', b'"mess\x80age"'))
    want.add(("bad-key", 1))
    repaired["bad-key"] = ""
    add("ADDED", good[1])
    want.add(("good-1", 1))
    for junk in (
        b"not json at all",
        b"[1,2,3]",
        b'{"type":"ADDED"}',
        b'{"object":{}}',
        b"\x00\x01\x02",
        b'"str"',
    ):
        lines.append(junk)
        dropped["malformed_line"] += 1
    add("ADDED", [])  # object is a list
    add("ADDED", "a string")
    add("MODIFIED", {"metadata": "not a map"})
    add("ADDED", {"metadata": {"name": "no-uid", "namespace": "default"}})
    add("ADDED", {"metadata": {"name": "int-uid", "namespace": "default", "uid": 42}})
    dropped["malformed"] += 5
    add("SOMETHING", good[2])
    dropped["unknown_watch_type"] += 1
    add("ADDED", big)
    want.add(("big-1mib", 1))
    add("ADDED", good[3])
    want.add(("good-3", 1))
    add("MODIFIED", good[3] | {"count": 2})
    want.add(("good-3", 2))
    add("ADDED", good[4])
    want.add(("good-4", 1))
    return lines, want, dropped, repaired


async def hostile_stream(tmp: Path) -> Report:
    """Raw hostile bytes in the list and the watch stream: every line is either delivered or counted
    in eventrouter_source_dropped{reason}, broken Unicode is repaired (U+FFFD) and counted in
    eventrouter_source_repaired; the watch keeps running (no relist, no crash)."""
    lines, want, dropped, repaired = hostile_lines()
    page, listed = hostile_list_page()
    want |= {(uid, 1) for uid in listed}
    repaired |= {uid: m for uid, m in listed.items() if uid != "list-clean"}
    async with HostileApiServer(lines, list_body=page) as server:
        router = Router(settings_for(server, tmp), [memory_spec()])
        async with router.running():
            await until(lambda: want <= set(memory_keys(router)), timeout=30)
            await settle(router)
            counted = {r: router.metrics.source_dropped.labels(r)._value.get() for r in dropped}
            facts: dict[str, Any] = {
                "lines": len(lines),
                "watches_opened": server.watches,
                **{f"dropped_{k}": v for k, v in counted.items()},
                **{f"expected_dropped_{k}": v for k, v in dropped.items()},
                "repaired": router.metrics.source_repaired.labels("invalid_unicode")._value.get(),
                "expected_repaired": len(repaired),
                "running": not router.stopped.is_set(),
            }
        sink = router.sinks["mem"]
        assert isinstance(sink, MemorySink)
        messages = {o.uid: o.record["message"] for o in sink.received}
        facts["repaired_messages_wrong"] = {
            uid: messages.get(uid) for uid, m in repaired.items() if messages.get(uid) != m
        }
        got = memory_keys(router)
        return Report("hostile watch stream", [Ledger.of(want).account("mem", got)], facts)
