"""Loopback receivers for benchmarks, run as their own process so their CPU is not the router's.

    python -m bench.receivers        # prints one JSON line with the URLs, serves until stdin closes

Serves the project's validating test receivers (webhook, Loki, SLS) plus a control endpoint:
``GET /counts`` (occurrences accepted so far, per receiver, and receipt times for lag samples) and
``POST /reset``. What has been counted is dropped, so a long run does not hold every body in memory.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import orjson
from aiohttp import web

from eventrouter.testing.receivers.loki import LokiReceiver
from eventrouter.testing.receivers.sls import AccessKey, SLSReceiver
from eventrouter.testing.receivers.webhook import WebhookReceiver

SLS_PROJECT = "bench"
SLS_LOGSTORE = "k8s-event"
SLS_KEY_ID = "bench-key-id"
SLS_KEY_SECRET = "bench-key-secret"  # a loopback test credential, not a secret


class Counts:
    def __init__(self, hook: WebhookReceiver, loki: LokiReceiver, sls: SLSReceiver) -> None:
        self.hook, self.loki, self.sls = hook, loki, sls
        self.totals = {"webhook": 0, "loki": 0, "sls": 0}
        self.requests = dict.fromkeys(self.totals, 0)  # requests answered 2xx: a sink's pushes per batch
        self.keep_keys = False
        self.keys: list[tuple[str, int, float]] = []  # (uid, occurrence, arrival) from webhook bodies

    def collect(self) -> None:
        reqs, self.hook.requests[:] = list(self.hook.requests), []
        for r in reqs:
            if r.status is None or not 200 <= r.status < 300:
                if r.status is None:
                    self.hook.requests.append(r)  # still being answered
                continue
            docs = orjson.loads(r.body)
            docs = docs if isinstance(docs, list) else [docs]
            self.totals["webhook"] += len(docs)
            self.requests["webhook"] += 1
            if self.keep_keys:
                self.keys.extend((d["uid"], d["occurrence"], r.arrived) for d in docs)
        self.totals["loki"] += len(self.loki.entries)
        self.loki.entries.clear()
        self.requests["loki"] += sum(200 <= p.status < 300 for p in self.loki.pushes)
        self.loki.pushes.clear()
        self.totals["sls"] += sum(len(g.logs) for g in self.sls.groups)
        self.requests["sls"] += len(self.sls.groups)
        self.sls.groups.clear()
        self.sls.requests.clear()

    def reset(self) -> None:
        self.collect()
        # A new run replays the same event times: forget each stream's newest entry (Loki's
        # out-of-order window would otherwise refuse them as "too far behind").
        self.loki._newest.clear()
        self.totals = dict.fromkeys(self.totals, 0)
        self.requests = dict.fromkeys(self.totals, 0)
        self.keys.clear()


async def main() -> None:
    keys = [AccessKey(SLS_KEY_ID, SLS_KEY_SECRET)]
    async with (
        WebhookReceiver() as hook,
        LokiReceiver() as loki,
        SLSReceiver(projects={SLS_PROJECT: [SLS_LOGSTORE]}, keys=keys) as sls,
    ):
        counts = Counts(hook, loki, sls)

        async def get_counts(request: web.Request) -> web.Response:
            counts.collect()
            body: dict[str, Any] = {"totals": counts.totals, "requests": counts.requests, "now": time.time()}
            if request.query.get("keys"):
                body["keys"], counts.keys = counts.keys, []
            return web.Response(body=orjson.dumps(body), content_type="application/json")

        async def reset(request: web.Request) -> web.Response:
            counts.reset()
            counts.keep_keys = request.query.get("keys") == "1"
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_get("/counts", get_counts)
        app.router.add_post("/reset", reset)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        print(
            orjson.dumps(
                {
                    "control": f"http://127.0.0.1:{port}",
                    "webhook": hook.url,
                    "loki": loki.url,
                    "sls": sls.url,
                }
            ).decode(),
            flush=True,
        )
        loop = asyncio.get_running_loop()
        # Serve until the parent closes our stdin (or dies).
        await loop.run_in_executor(None, sys.stdin.buffer.read)
        await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
