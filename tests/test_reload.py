"""Sink options re-read when a file they name changes (engine/reload.py): a credential rotated in a
Secret volume, laid out and swapped as the kubelet does (eventrouter.testing.secret_volume), reaches
the sink without a restart and without losing or repeating an occurrence."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest

from eventrouter.app import Router, RouterSettings
from eventrouter.config import build_specs, spec_for_class
from eventrouter.engine.checkpoint import MemoryCheckpoint, SinkCheckpoint
from eventrouter.engine.deadletter import DeadLetter
from eventrouter.engine.filter import compile_filter
from eventrouter.engine.pipeline import Pipeline
from eventrouter.engine.reload import SETTLE, SinkReloader, watched_files
from eventrouter.metrics import Metrics
from eventrouter.options import Secret, file_options
from eventrouter.sink import SinkContext
from eventrouter.source.watcher import WatchSettings
from eventrouter.testing import MemorySink, MemorySinkOptions, event_object, make_occurrence
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.receivers.loki import LokiReceiver
from eventrouter.testing.receivers.webhook import WebhookReceiver
from eventrouter.testing.secret_volume import SecretVolume
from eventrouter.testing.tls import certificate
from eventrouter.testing.waiting import until
from eventrouter_sinks.loki import LokiSink
from eventrouter_sinks.webhook import WebhookOptions

OLD, NEW = "old-token-7d1c", "new-token-93fa"


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(token="secret-token") as server:
        server.bookmark_interval = 0.2
        yield server


def _router(api: FakeApiServer, tmp_path: Path, flag: str, **kw: Any) -> Router:
    settings = RouterSettings(
        cluster_name="test",
        kubeconfig=str(api.kubeconfig(tmp_path / "kubeconfig")),
        metrics_addr=None,
        shutdown_timeout=5.0,
        watch=WatchSettings(watch_timeout=30, backoff_initial=0.05, backoff_max=0.5),
        reload_interval=kw.pop("reload_interval", 0.05),
        **kw,
    )
    return Router(settings, build_specs([flag]))


def _reloads(router: Router, result: str, sink: str = "loki") -> float:
    value = router.metrics.registry.get_sample_value(
        "eventrouter_sink_reloads_total", {"sink": sink, "result": result}
    )
    return value or 0.0


def _loki_keys(loki: LokiReceiver) -> collections.Counter[tuple[str, int]]:
    records = (json.loads(e.line) for e in loki.entries)
    return collections.Counter((r["uid"], r["count"]) for r in records)


def _loki_flag(loki: LokiReceiver, token_file: Path, **opts: Any) -> str:
    query = "&".join(f"{k}={v}" for k, v in {"batch_max_wait": 0.02, **opts}.items())
    return f"loki:{loki.url}?bearer_token=file:{token_file}&{query}"


# ---- which files are watched ----------------------------------------------------------------------


def test_the_watched_files_are_the_file_references_and_the_file_options(tmp_path: Path) -> None:
    for name in ("token", "hook-secret", "api-key", "scope", "org"):
        (tmp_path / name).write_text("x")
    # A CA bundle is checked for a certificate OpenSSL can load (options.check_tls_files).
    (tmp_path / "ca.crt").write_bytes(certificate(tmp_path, name="ca")[0].read_bytes())
    (tmp_path / "header").write_text("X-Api-Key: abc")
    (tmp_path / "template.json").write_text('{"m": "{{message}}"}')
    loki, hook, named = build_specs(
        [
            f"loki:http://loki:3100?bearer_token=file:{tmp_path}/token&headers=file:{tmp_path}/header"
            f"&ca_file={tmp_path}/ca.crt&tenant=ops",
            f"webhook:http://hook/x?secret=file:{tmp_path}/hook-secret&bearer_token=env:HOME"
            f"&body_template_file={tmp_path}/template.json&headers=X-Api-Key=file:{tmp_path}/api-key"
            "&headers=X-Team:ops",
            f"loki:http://loki:3100?name=named&headers=X-Scope-Token:file:{tmp_path}/scope&headers=X-Org: file:{tmp_path}/org",
        ]
    )
    assert watched_files(loki) == {
        f"{tmp_path}/token": ["bearer_token"],
        f"{tmp_path}/header": ["headers"],
        f"{tmp_path}/ca.crt": ["ca_file"],
    }
    # env: references and literals are not files; a template is (a ConfigMap may hold it), and so is
    # a file named inside a header entry (item 182: a rotated header value was never taken).
    assert watched_files(hook) == {
        f"{tmp_path}/hook-secret": ["secret"],
        f"{tmp_path}/template.json": ["body_template_file"],
        f"{tmp_path}/api-key": ["headers.X-Api-Key"],
    }
    assert watched_files(named) == {
        f"{tmp_path}/scope": ["headers.X-Scope-Token"],
        f"{tmp_path}/org": ["headers.X-Org"],
    }
    assert set(file_options(WebhookOptions)) == {"body_template_file", "ca_file", "cert_file", "key_file"}


def test_a_secret_volume_swaps_every_key_at_once_as_the_kubelet_does(tmp_path: Path) -> None:
    volume = SecretVolume(tmp_path / "secrets", {"token": OLD, "user": "bob"})
    token = volume.file("token")
    before = os.stat(token).st_ino
    assert token.is_symlink() and os.readlink(token) == "..data/token"
    volume.update({"token": NEW})
    assert token.read_text() == NEW and os.stat(token).st_ino != before
    assert not volume.file("user").exists()  # a key that left the payload
    assert [p.name for p in volume.path.iterdir() if p.name.startswith("..2")].__len__() == 1


# ---- a rotated credential under a running router ----------------------------------------------------


async def test_a_rotated_loki_token_is_used_without_a_restart_and_nothing_is_lost_or_repeated(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    volume = SecretVolume(tmp_path / "secrets", {"loki-token": OLD})
    async with LokiReceiver(bearer_token=OLD) as loki:
        # A retry waits 30-60 s: only the reload's nudge delivers within the test's 10 s.
        flag = _loki_flag(loki, volume.file("loki-token"), retry_initial_backoff=60, retry_max_backoff=60)
        router = _router(api, tmp_path, flag)
        async with router.running():
            first_sink = router.sinks["loki"]
            for i in range(10):
                api.create_event(event_object(object_name=f"before-{i}"))
            await until(lambda: sum(_loki_keys(loki).values()) == 10)
            # The credential is rotated at Loki first: the router's pushes are refused (401) ...
            loki.bearer_token = NEW
            for i in range(10):
                api.create_event(event_object(object_name=f"during-{i}"))
            await until(lambda: any(p.status == 401 for p in loki.pushes))
            # ... until the kubelet brings the new Secret into the pod.
            volume.update({"loki-token": NEW})
            await until(lambda: sum(_loki_keys(loki).values()) == 20)
            for i in range(5):
                api.create_event(event_object(object_name=f"after-{i}"))
            await until(lambda: sum(_loki_keys(loki).values()) == 25)
            assert router.sinks["loki"] is not first_sink
            assert _reloads(router, "applied") == 1 and _reloads(router, "invalid") == 0
            dead = router.metrics.registry.get_sample_value(
                "eventrouter_sink_dead_lettered_total", {"sink": "loki", "reason": "rejected"}
            )
            assert dead == 0
        keys = _loki_keys(loki)
    assert len(keys) == 25 and set(keys.values()) == {1}
    assert all(p.status == 204 for p in loki.pushes if p.status != 401)
    reload_lines = [r.getMessage() for r in caplog.records if "rebuilt" in r.getMessage()]
    assert reload_lines == [
        f"sink loki: {volume.file('loki-token')} (bearer_token) changed (bearer_token); "
        "the sink is rebuilt with it before its next send"
    ]
    assert OLD not in caplog.text and NEW not in caplog.text


async def test_a_credential_file_that_goes_away_is_an_error_and_the_sink_keeps_what_it_had(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    volume = SecretVolume(tmp_path / "secrets", {"loki-token": OLD})
    async with LokiReceiver(bearer_token=OLD) as loki:
        router = _router(api, tmp_path, _loki_flag(loki, volume.file("loki-token")))
        async with router.running():
            sink = router.sinks["loki"]
            volume.update({"other": "x"})  # the key left the Secret
            await until(lambda: _reloads(router, "invalid") == 1)
            for i in range(5):
                api.create_event(event_object(object_name=f"web-{i}"))
            await until(lambda: sum(_loki_keys(loki).values()) == 5)
            assert router.sinks["loki"] is sink
            # The same Secret again, with the same value: checked, nothing rebuilt.
            volume.update({"loki-token": OLD})
            await until(lambda: _reloads(router, "unchanged") == 1)
            assert router.sinks["loki"] is sink and _reloads(router, "applied") == 0
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, errors
    assert f"{volume.file('loki-token')} (bearer_token) changed, but its options are invalid now" in errors[0]
    assert "cannot read secret file" in errors[0] and OLD not in caplog.text


async def test_a_change_is_taken_only_once_the_file_reads_the_same_on_two_checks(
    api: FakeApiServer, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text(OLD)
    async with LokiReceiver(bearer_token=OLD) as loki:
        router = _router(api, tmp_path, _loki_flag(loki, token), reload_interval=0)
        async with router.running(watch=False):
            (reloader,) = router.reloaders
            assert not reloader.check()  # nothing changed
            token.write_text("half-wri")  # a file being written by hand
            assert not reloader.check()
            token.write_text(NEW)
            os.utime(token, ns=(1, 1))  # a different mtime from the half-written state's
            assert not reloader.check()  # changed again since the last check: not settled
            assert reloader.check()  # the same on two checks: taken
            assert not reloader.check()
            assert _reloads(router, "applied") == 1
            assert isinstance(router.pipelines[0]._replacement, LokiSink)
            assert router.pipelines[0]._replacement.options.bearer_token is not None
            assert router.pipelines[0]._replacement.options.bearer_token.get_secret_value() == NEW


async def test_a_certificate_file_rewritten_in_place_rebuilds_the_sink_only_when_its_content_changed(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """A file option's value is a path, equal before and after a rotation: its content decides."""
    token, ca = tmp_path / "token", tmp_path / "ca.pem"
    token.write_text(OLD)
    # Certificates OpenSSL loads: a file that holds none is refused (options.check_tls_files).
    old, new = [
        (await asyncio.to_thread(certificate, tmp_path, name=n))[0].read_bytes() for n in ("old", "new")
    ]
    ca.write_bytes(old)
    async with LokiReceiver(bearer_token=OLD) as loki:
        flag = _loki_flag(loki, token, ca_file=ca)
        router = _router(api, tmp_path, flag, reload_interval=0)
        async with router.running(watch=False):
            (reloader,) = router.reloaders
            ca.write_bytes(old)  # the same bytes again
            os.utime(ca, ns=(2, 2))
            assert not reloader.check() and not reloader.check()
            assert _reloads(router, "unchanged") == 1
            ca.write_bytes(new)
            os.utime(ca, ns=(3, 3))
            assert not reloader.check() and reloader.check()
            assert _reloads(router, "applied") == 1


async def test_reload_interval_0_reads_the_files_only_at_start(api: FakeApiServer, tmp_path: Path) -> None:
    from eventrouter.cli import _parser, _settings
    from eventrouter.config import RouterConfig

    args = _parser().parse_args(["run", "--reload-interval", "0"])
    assert _settings(args, RouterConfig()).reload_interval == 0
    token = tmp_path / "token"
    token.write_text(OLD)
    async with LokiReceiver(bearer_token=OLD) as loki:
        for interval, watching in ((0.0, False), (5.0, True)):
            router = _router(api, tmp_path, _loki_flag(loki, token), reload_interval=interval)
            async with router.running(watch=False):
                assert router.reloaders  # the files are known either way
                assert any(t.get_name() == "sink-reload" for t in router._tasks) is watching


async def test_sighup_rebuilds_a_sink_whose_file_changed_at_once(api: FakeApiServer, tmp_path: Path) -> None:
    """With the periodic check off (reload_interval 0), a SIGHUP is how an operator says "re-read"."""
    token = tmp_path / "token"
    token.write_text(OLD)
    async with LokiReceiver(bearer_token=OLD) as loki:
        router = _router(api, tmp_path, _loki_flag(loki, token), reload_interval=0)
        async with router.running(watch=False):
            router.reload_files()
            assert _reloads(router, "applied") == 0  # nothing changed
            token.write_text(NEW)
            router.reload_files()
            assert _reloads(router, "applied") == 1


class _KeyedOptions(MemorySinkOptions):
    api_key: Secret


class _KeyedSink(MemorySink):
    """A plugin that checks its credential's form when built, as a client library may."""

    options_model = _KeyedOptions  # type: ignore[assignment]  # a narrower model, as a plugin has

    def __init__(self, options: _KeyedOptions, context: object) -> None:
        if not options.api_key.get_secret_value().startswith("ak-"):
            raise ValueError("api_key must start with 'ak-'")
        super().__init__(options, context)


async def test_a_plugin_that_cannot_be_built_with_the_new_file_is_counted_invalid_and_keeps_its_instance(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = tmp_path / "key"
    key.write_text("ak-old-1")
    spec = spec_for_class(_KeyedSink, {"name": "plug", "api_key": f"file:{key}"}, type_="keyed")
    context = SinkContext(name="plug", cluster="t", data_dir=None, logger=logging.getLogger("plug"))
    sink = _KeyedSink(cast(_KeyedOptions, spec.options), context)
    metrics = Metrics()
    pipeline = Pipeline(
        name="plug",
        sink=sink,
        options=spec.pipeline,
        predicate=compile_filter(spec.filter),
        checkpoint=SinkCheckpoint(MemoryCheckpoint()),
        deadletter=DeadLetter(None, sink="plug"),
        metrics=metrics,
    )
    reloader = SinkReloader(spec, pipeline, metrics)
    key.write_text("not-a-key-value")
    assert not reloader.check() and not reloader.check()  # seen, then settled: its __init__ raises
    assert pipeline._replacement is None and pipeline.sink is sink
    invalid = metrics.registry.get_sample_value(
        "eventrouter_sink_reloads_total", {"sink": "plug", "result": "invalid"}
    )
    assert invalid == 1
    (error,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert error == (
        f"sink plug: {key} (api_key) changed, but the sink cannot be built with it (ValueError: api_key "
        "must start with 'ak-'); it goes on with the options it had"
    )
    assert "not-a-key-value" not in caplog.text
    key.write_text("ak-new-2")  # put right: taken
    assert not reloader.check() and reloader.check()
    assert isinstance(pipeline._replacement, _KeyedSink)
    assert pipeline._replacement.options.api_key.get_secret_value() == "ak-new-2"


class Boom(BaseException):
    """A library's own BaseException subclass (gevent's Timeout is such)."""


class _TokenOptions(MemorySinkOptions):
    token: Secret
    raises: str = "Boom"


class _Picky(MemorySink):
    """A plugin whose client library refuses a token it dislikes with a BaseException quoting it."""

    options_model = _TokenOptions  # type: ignore[assignment]  # a narrower model, as a plugin has

    def __init__(self, options: _TokenOptions, context: object) -> None:
        token = options.token.get_secret_value()
        if token.startswith("bad"):
            raise {"Boom": Boom, "ValueError": ValueError}[options.raises](f"token {token} refused")
        super().__init__(options, context)


@pytest.mark.parametrize("raises", ["Boom", "ValueError"])
async def test_a_plugin_whose_constructor_raises_at_a_rotation_costs_only_that_reload_and_shows_no_secret(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture, raises: str
) -> None:
    """Before, Boom left ``check()``, ended the reload task and so stopped the router (exit 1): every
    sink stopped because a token file was rotated; and a ValueError's text was logged with the token."""
    token = tmp_path / "token"
    token.write_text("good-token-1")
    options = {"name": "plug", "token": f"file:{token}", "raises": raises, "batch_max_wait": 0.02}
    spec = spec_for_class(_Picky, options, type_="p")
    settings = RouterSettings(
        cluster_name="test",
        kubeconfig=str(api.kubeconfig(tmp_path / "kubeconfig")),
        metrics_addr=None,
        watch=WatchSettings(watch_timeout=30, backoff_initial=0.05, backoff_max=0.5),
        reload_interval=0.05,
    )
    router = Router(settings, [spec])
    async with router.running():
        sink = router.sinks["plug"]
        assert isinstance(sink, _Picky)
        token.write_text("bad-token-5ecr3t")
        await until(lambda: _reloads(router, "invalid", "plug") == 1)
        api.create_event(event_object(object_name="after-the-rotation"))
        await until(lambda: len(sink.received) == 1)  # the instance it had delivers on
        assert router.sinks["plug"] is sink and not router.stopped.is_set()
    assert router.exit_code == 0
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [
        f"sink plug: {token} (token) changed, but the sink cannot be built with it ({raises}: token **** "
        "refused); it goes on with the options it had"
    ]
    assert "5ecr3t" not in caplog.text


async def test_the_router_looks_at_a_changed_file_again_after_settle_not_after_a_whole_interval(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """Every `interval` s the files are checked; a change seen is taken on a second look SETTLE s
    later. With an interval three times SETTLE, taking it within two SETTLEs of being seen shows
    the second look did not wait for the next interval."""
    interval = 3 * SETTLE
    volume = SecretVolume(tmp_path / "secrets", {"loki-token": OLD})
    async with LokiReceiver(bearer_token=OLD) as loki:
        router = _router(api, tmp_path, _loki_flag(loki, volume.file("loki-token")), reload_interval=interval)
        async with router.running(watch=False):
            (reloader,) = router.reloaders
            volume.update({"loki-token": NEW})
            await until(lambda: reloader.settling, timeout=interval + 5)
            await until(lambda: _reloads(router, "applied") == 1, timeout=2 * SETTLE)


async def test_a_reload_during_a_retry_after_wait_sends_nothing_before_the_time_the_destination_asked(
    tmp_path: Path,
) -> None:
    """A 429 with Retry-After: 2, then a rotated credential: the reload ended the wait at once and the
    new instance's request came well before the 2 s. Now the wait ends at the time asked, and the new
    instance sends then. A stop still ends such a wait at once."""
    volume = SecretVolume(tmp_path / "secrets", {"token": OLD})
    async with WebhookReceiver() as hook:
        (spec,) = build_specs(
            [f"webhook:{hook.url}?bearer_token=file:{volume.file('token')}&batch_max_wait=0.01"]
        )
        context = SinkContext(name=spec.name, cluster="t", data_dir=None, logger=logging.getLogger("hook"))
        metrics = Metrics()
        pipeline = Pipeline(
            name=spec.name,
            sink=spec.build(context),
            options=spec.pipeline,
            predicate=None,
            checkpoint=SinkCheckpoint(MemoryCheckpoint()),
            deadletter=DeadLetter(None, sink=spec.name),
            metrics=metrics,
        )
        reloader = SinkReloader(spec, pipeline, metrics)
        task = asyncio.create_task(pipeline.run())
        hook.fail_next(1, 429, retry_after="2")
        pipeline.offer(make_occurrence(object_name="web-0"))
        await until(lambda: hook.requests and hook.requests[0].status == 429)
        refused = hook.requests[0]
        volume.update({"token": NEW})
        assert not reloader.check() and reloader.check()  # seen, then settled: the sink is rebuilt
        await hook.wait_for(2)
        again = hook.requests[1]
        assert again.arrived - refused.arrived >= 2.0, (
            f"sent {again.arrived - refused.arrived:.2f}s after the 429"
        )
        assert again.headers["Authorization"] == f"Bearer {NEW}"  # the new instance, once the wait ended
        await until(lambda: again.status == 200)

        hook.fail_next(1, 503, retry_after="30")
        pipeline.offer(make_occurrence(object_name="web-1"))
        await until(lambda: len(hook.requests) == 3 and hook.requests[2].status == 503)
        volume.update({"token": OLD})
        assert not reloader.check() and reloader.check()  # a reload during the wait: it goes on ...
        pipeline.stop_now()
        await asyncio.wait_for(task, 2)  # ... and a stop ends it at once, 28 s before its time
        await pipeline.close_sink()
    assert len(hook.requests) == 3
