"""Command line: ``eventrouter run | sinks | check | replay``.

Exit codes: 0 success, 1 runtime failure (a sink unreachable in ``check``, loss in ``replay``),
2 invalid configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel

from eventrouter.app import Router, RouterSettings
from eventrouter.config import ConfigError, RouterConfig, SinkSpec, build_specs, load_yaml
from eventrouter.gc_tuning import tune_gc
from eventrouter.logs import setup_logging
from eventrouter.metrics import DEAD_LETTER_REASONS, SINK_DROP_REASONS
from eventrouter.plugins import PluginError, discover
from eventrouter.sink import SinkContext
from eventrouter.source import unicode_repair
from eventrouter.source.watcher import WatchSettings

__all__ = ["main"]

log = logging.getLogger("eventrouter")


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _listen_addr(text: str) -> str:
    """``host:port`` (``[v6]:port``; an empty host listens everywhere), checked before anything starts."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not host:port with a port in 0-65535")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise argparse.ArgumentTypeError(f"{text!r}: an IPv6 address goes in brackets, e.g. [::]:8080")
    return text


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sink", action="append", default=[], metavar="TYPE:URL?OPTS", help="a sink, repeatable")
    p.add_argument("--config", type=Path, help="YAML file with cluster_name, namespaces and sinks")
    p.add_argument("--data-dir", type=Path, help="checkpoints, spools and dead letters (persistent volume)")
    p.add_argument("--cluster-name", help="stamped on every record as `cluster`")
    p.add_argument(
        "--log-level",
        type=str.lower,
        choices=LOG_LEVELS,
        default=os.environ.get("EVENTROUTER_LOG_LEVEL", "info"),
    )
    p.add_argument(
        "--log-format", choices=["text", "json"], default=os.environ.get("EVENTROUTER_LOG_FORMAT", "text")
    )


def _parser() -> argparse.ArgumentParser:
    # Not from __doc__: `python -OO` (or PYTHONOPTIMIZE=2) strips docstrings.
    parser = argparse.ArgumentParser(
        prog="eventrouter", description="Route every Kubernetes Event occurrence to pluggable sinks."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="watch the cluster's events and route them to the sinks")
    _common(run)
    run.add_argument("--namespace", action="append", default=[], help="watch only these (repeatable)")
    run.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, then $KUBECONFIG)")
    run.add_argument("--context", help="kubeconfig context")
    run.add_argument(
        "--metrics-addr",
        type=_listen_addr,
        default="0.0.0.0:8080",
        help="host:port for /metrics /healthz /readyz",
    )
    run.add_argument("--shutdown-timeout", type=float, default=25.0, help="seconds to drain on SIGTERM")
    run.add_argument("--field-selector", default="", help="server-side field selector, e.g. type=Warning")
    run.add_argument("--watch-timeout", type=int, default=290, help="server-side watch timeoutSeconds")
    run.add_argument(
        "--stall-timeout", type=float, default=600.0, help="/healthz fails after this long without progress"
    )
    run.add_argument("--leader-elect", action="store_true", help="only the Lease holder watches and delivers")
    run.add_argument("--leader-elect-namespace", default=os.environ.get("POD_NAMESPACE", "default"))
    run.add_argument("--leader-elect-name", default="eventrouter", help="Lease name")
    run.add_argument("--leader-elect-lease-duration", type=float, default=15.0, help="seconds")
    run.add_argument("--leader-elect-renew-deadline", type=float, default=10.0, help="seconds")
    run.add_argument("--leader-elect-retry-period", type=float, default=2.0, help="seconds")
    run.add_argument(
        "--checkpoint-configmap",
        help="keep checkpoints in this ConfigMap (namespace: $POD_NAMESPACE) instead of --data-dir",
    )
    run.add_argument(
        "--demo",
        action="store_true",
        help="no cluster needed: run against the built-in test API server replaying recorded events",
    )

    sinks = sub.add_parser("sinks", help="list installed sinks and their options")
    sinks.add_argument("name", nargs="?", help="show one sink")
    sinks.add_argument("--json", action="store_true", help="machine-readable output")

    check = sub.add_parser("check", help="validate the configuration and reach every sink")
    _common(check)

    replay = sub.add_parser(
        "replay",
        help="route a `kubectl get events -A -o json`, a JSON-lines watch recording or a dead-letter file",
    )
    _common(replay)
    replay.add_argument("file", help="file to read, - for stdin")
    replay.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for delivery")
    return parser


# ---- configuration -------------------------------------------------------------------------------


def _load(args: argparse.Namespace) -> tuple[RouterConfig, list[SinkSpec]]:
    cfg = load_yaml(args.config) if args.config else RouterConfig()
    specs = build_specs(args.sink, cfg.sinks, yaml_source=str(args.config or "config"))
    return cfg, specs


def _writable_data_dir(path: Path) -> Path:
    """The data dir, made if missing, once a file could be written there: a volume that was not
    mounted (a read-only root in a container) is a configuration error named at start, not a
    traceback from the first sink that needs it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ConfigError(
            f"--data-dir {path}: cannot write there ({exc.strerror}); mount a writable volume there"
            " or leave --data-dir out"
        ) from None
    return path


def _settings(args: argparse.Namespace, cfg: RouterConfig) -> RouterSettings:
    data_dir = args.data_dir or (Path(cfg.data_dir) if cfg.data_dir else None)
    if data_dir is not None:
        data_dir = _writable_data_dir(data_dir)
    return RouterSettings(
        cluster_name=args.cluster_name or cfg.cluster_name,
        namespaces=list(getattr(args, "namespace", []) or cfg.namespaces),
        data_dir=data_dir,
        kubeconfig=getattr(args, "kubeconfig", None),
        context=getattr(args, "context", None),
        metrics_addr=getattr(args, "metrics_addr", None),
        shutdown_timeout=getattr(args, "shutdown_timeout", 25.0),
        stall_timeout=getattr(args, "stall_timeout", 600.0),
        leader_elect=getattr(args, "leader_elect", False),
        leader_namespace=getattr(args, "leader_elect_namespace", "default"),
        leader_name=getattr(args, "leader_elect_name", "eventrouter"),
        leader_identity=os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}",
        lease_duration=getattr(args, "leader_elect_lease_duration", 15.0),
        renew_deadline=getattr(args, "leader_elect_renew_deadline", 10.0),
        retry_period=getattr(args, "leader_elect_retry_period", 2.0),
        checkpoint_configmap=getattr(args, "checkpoint_configmap", None),
        checkpoint_namespace=os.environ.get("POD_NAMESPACE", "default"),
        watch=WatchSettings(
            field_selector=getattr(args, "field_selector", "") or cfg.field_selector,
            watch_timeout=getattr(args, "watch_timeout", 290),
        ),
    )


# ---- run -----------------------------------------------------------------------------------------


async def _run(args: argparse.Namespace) -> int:
    cfg, specs = _load(args)
    settings = _settings(args, cfg)
    async with contextlib.AsyncExitStack() as stack:
        demo_api: Any = None
        if args.demo:
            specs, demo_api = await _demo_setup(settings, specs, stack)
        if not specs:
            raise ConfigError("no sinks configured: add --sink=TYPE:URL or a `sinks:` list in --config")
        router = Router(settings, specs)
        tune_gc()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, router.request_stop)
        if demo_api is not None:
            stack.push_async_callback(_cancel, asyncio.create_task(_demo_traffic(router, demo_api)))
        try:
            await router.run()
        except ValueError as exc:  # e.g. leader election durations out of order
            raise ConfigError(str(exc)) from None
    return router.exit_code


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _demo_setup(
    settings: RouterSettings, specs: list[SinkSpec], stack: contextlib.AsyncExitStack
) -> tuple[list[SinkSpec], Any]:
    """Start the built-in test API server and point the router at it; traffic follows once it watches."""
    from eventrouter.testing.apiserver import FakeApiServer

    api = await stack.enter_async_context(FakeApiServer(token="demo"))
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="eventrouter-demo-")))
    settings.kubeconfig = str(api.kubeconfig(tmp / "kubeconfig"))
    settings.cluster_name = settings.cluster_name or "demo"
    log.info("demo: built-in API server at %s replays events recorded from a real 1.24 cluster", api.url)
    if not specs:
        out = Path("eventrouter-demo")
        try:
            out.mkdir(exist_ok=True)
        except OSError as exc:  # a read-only root or another user's directory, as in a container
            log.warning("demo: cannot create %s (%s): writing to stdout only", out.absolute(), exc.strerror)
            specs = build_specs(["stdout:"])
        else:
            specs = build_specs(["stdout:", f"file:{out.resolve() / 'events.jsonl'}"])
            log.info("demo: writing to stdout and %s", out / "events.jsonl")
    return specs, api


async def _demo_traffic(router: Router, api: Any) -> None:
    """Replay the recording once the router watches (every occurrence shows, repeats included),
    then keep raising a crash-looping pod's BackOff count every few seconds."""
    from eventrouter.testing import recorded_watch

    # After the initial list, not after every sink started: a sink whose destination is down queues
    # (and says so) while the others show the demo.
    while not router.watchers:  # noqa: ASYNC110 - the watchers are made by the router's start
        await asyncio.sleep(0.05)
    await asyncio.gather(*(w.initial_list_done.wait() for w in router.watchers))
    await api.load_recording(recorded_watch())
    backoffs = [e for e in api.events() if e.get("reason") == "BackOff"]
    while backoffs:
        await asyncio.sleep(5)
        target = backoffs[0]["metadata"]
        api.bump(target["namespace"], target["name"])


# ---- sinks ---------------------------------------------------------------------------------------


def _describe_model(model: type[BaseModel]) -> list[dict[str, Any]]:
    rows = []
    for name, info in model.model_fields.items():
        alias = info.validation_alias
        aliases = [a for a in getattr(alias, "choices", []) if isinstance(a, str) and a != name]
        default = None if info.is_required() else info.get_default(call_default_factory=True)
        annotation = getattr(info.annotation, "__name__", None) or str(info.annotation).replace("typing.", "")
        rows.append(
            {
                "name": name,
                "aliases": aliases,
                "type": annotation,
                "required": info.is_required(),
                "default": None if "Secret" in annotation else default,
                "description": info.description or "",
            }
        )
    return rows


def _sinks(args: argparse.Namespace) -> int:
    from eventrouter.options import FilterOptions, PipelineOptions

    plugins = discover()
    if args.name and args.name not in plugins:
        print(f"unknown sink {args.name!r}; installed: {', '.join(sorted(plugins))}", file=sys.stderr)
        return 2
    out: dict[str, Any] = {}
    for name, plugin in sorted(plugins.items()):
        if args.name and name != args.name:
            continue
        try:
            cls = plugin.load()
        except PluginError as exc:
            out[name] = {"distribution": plugin.distribution, "error": str(exc)}
            continue
        out[name] = {
            "distribution": f"{plugin.distribution} {plugin.version}",
            "description": cls.description or (cls.__doc__ or "").strip().split("\n")[0],
            "options": _describe_model(cls.options_model),
            "default_filter": dict(getattr(cls, "default_filter", {}) or {}),
        }
    common = {"filter": _describe_model(FilterOptions), "pipeline": _describe_model(PipelineOptions)}
    if args.json:
        print(
            orjson.dumps({"sinks": out, "common": common}, option=orjson.OPT_INDENT_2, default=str).decode()
        )
        return 0
    for name, info in out.items():
        if "error" in info:
            print(f"{name}  [broken] {info['error']}")
            continue
        print(f"{name}  ({info['distribution']}) {info['description']}")
        for row in info["options"]:
            alias = f" (also: {', '.join(row['aliases'])})" if row["aliases"] else ""
            default = (
                ""
                if row["required"] or row["default"] in (None, "", [], {})
                else f" [default {row['default']}]"
            )
            print(f"    {row['name']}{alias}: {row['type']}{default}  {row['description']}")
        print()
    print("Options every sink accepts (filters and pipeline):")
    for group in ("filter", "pipeline"):
        for row in common[group]:
            alias = f" (also: {', '.join(row['aliases'])})" if row["aliases"] else ""
            print(f"    {row['name']}{alias}: {row['description']}")
    return 0


# ---- check ---------------------------------------------------------------------------------------


async def _check(args: argparse.Namespace) -> int:
    cfg, specs = _load(args)
    if not specs:
        raise ConfigError("no sinks configured")
    failed = 0
    for spec in specs:
        context = SinkContext(
            name=spec.name,
            cluster=cfg.cluster_name,
            data_dir=None,
            logger=logging.getLogger(f"eventrouter.sink.{spec.name}"),
        )
        sink = spec.sink_cls(spec.options, context)
        try:
            async with asyncio.timeout(spec.pipeline.send_timeout):
                await sink.check()
        except Exception as exc:
            failed += 1
            print(f"FAIL  {spec.describe()}: {exc if str(exc) else type(exc).__name__}")
        else:
            print(f"ok    {spec.describe()}")
        finally:
            with contextlib.suppress(Exception):
                await sink.aclose()
    return 1 if failed else 0


# ---- replay --------------------------------------------------------------------------------------


def read_recording(data: bytes) -> Iterator[tuple[str, Any]]:
    """A ``kubectl get events -o json`` List, or JSON lines of watch events, bare Event objects or
    dead-letter entries (``<data-dir>/deadletter/<sink>.jsonl``: their ``event``, after a
    ``("DEADLETTER", (sink name, cluster))`` marker).

    Broken Unicode (invalid UTF-8, lone surrogate escapes) is replaced by U+FFFD, as the watch does;
    each repaired object is preceded by a ``("REPAIRED", None)`` marker, an unreadable line is a
    ``("MALFORMED", None)``."""
    text = data.lstrip()
    if text.startswith(b"{"):
        broken = False
        try:
            try:
                doc = orjson.loads(text)
            except orjson.JSONDecodeError as exc:
                doc = unicode_repair.parse_refused(text, exc)
                broken = True
        except orjson.JSONDecodeError:
            doc = None
        if isinstance(doc, dict) and isinstance(doc.get("items"), list):
            for n, item in enumerate(doc["items"]):
                if broken:
                    item = yield from _repaired(item, f"item {n}")
                yield "LIST", item
            return
        if isinstance(doc, dict):
            if broken:
                doc = yield from _repaired(doc, "the document")
            yield from _line_item(doc)
            return
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj, strings = unicode_repair.loads(line)
        except orjson.JSONDecodeError as exc:
            log.warning("replay: line %d is not JSON (%s); skipped", n, exc)
            yield "MALFORMED", None
            continue
        if strings:
            yield from _note_repaired(obj, strings, f"line {n}")
        yield from _line_item(obj)


def _repaired(obj: Any, where: str) -> Generator[tuple[str, Any], None, Any]:
    obj, strings = unicode_repair.repair(obj)
    if strings:
        yield from _note_repaired(obj, strings, where)
    return obj


def _note_repaired(obj: Any, strings: int, where: str) -> Iterator[tuple[str, Any]]:
    log.warning(
        "replay: %s (event %s) had invalid UTF-8 or lone surrogate escapes in %d strings: replaced by U+FFFD",
        where,
        unicode_repair.describe(obj),
        strings,
    )
    yield "REPAIRED", None


def _line_item(obj: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(obj, dict) and "type" in obj and isinstance(obj.get("object"), dict):
        yield str(obj["type"]), obj["object"]
    elif isinstance(obj, dict) and obj.keys() >= DEAD_LETTER_FIELDS:
        # A dead-letter line: the Event object it was made from (its occurrence number included).
        record = obj["record"]
        yield "DEADLETTER", (str(obj["sink"]), record.get("cluster") if isinstance(record, dict) else None)
        if isinstance(obj.get("event"), dict):
            yield "LIST", obj["event"]
        else:
            log.warning(
                "replay: dead-letter line for %s has no event object (written before eventrouter kept it); "
                "skipped",
                obj.get("key"),
            )
            yield "MALFORMED", None
    else:
        yield "LIST", obj


DEAD_LETTER_FIELDS = frozenset({"sink", "reason", "key", "record"})


def _dead_letter_replay(
    dead: set[tuple[str, Any]], specs: list[SinkSpec], settings: RouterSettings
) -> tuple[list[SinkSpec], RouterSettings]:
    """A dead-letter file goes back to the sinks that refused it when they are configured (the others
    have those occurrences already), without the data dir (its checkpoint counts them as done), and
    stamped with the cluster name its records have unless one is given."""
    dead_from = {sink for sink, _ in dead}
    clusters = {cluster for _, cluster in dead if cluster}
    if not settings.cluster_name and len(clusters) == 1:
        settings.cluster_name = clusters.pop()
    configured = {spec.name for spec in specs}
    if dead_from <= configured:
        specs = [spec for spec in specs if spec.name in dead_from]
        log.info("replay: dead letters of %s: sending them to that sink only", ", ".join(sorted(dead_from)))
    else:
        log.info(
            "replay: dead letters of %s, which is not configured here: sending them to %s",
            ", ".join(sorted(dead_from - configured)),
            ", ".join(spec.name for spec in specs),
        )
    if settings.data_dir is not None:
        log.info("replay: dead letters are sent without --data-dir (its checkpoint counts them as done)")
        settings.data_dir = None
    return specs, settings


async def _replay(args: argparse.Namespace) -> int:
    cfg, specs = _load(args)
    if not specs:
        raise ConfigError("no sinks configured")
    try:
        data = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {args.file!r}: {exc.strerror}") from None
    items = list(read_recording(data))
    settings = _settings(args, cfg)
    settings.metrics_addr = None
    settings.shutdown_timeout = args.timeout
    dead = {origin for kind, origin in items if kind == "DEADLETTER"}
    if dead:
        specs, settings = _dead_letter_replay(dead, specs, settings)
    router = Router(settings, specs)
    await router.start_pipelines()
    markers = ("MALFORMED", "REPAIRED", "DEADLETTER")
    occurrences, malformed = await router.replay((k, o) for k, o in items if k not in markers)
    malformed += sum(1 for k, _ in items if k == "MALFORMED")
    repaired = sum(1 for k, _ in items if k == "REPAIRED")
    if repaired:
        router.metrics.source_repaired.labels("invalid_unicode").inc(repaired)
    drained = await router.drain(args.timeout)
    await router.stop()
    m = router.metrics
    summary: dict[str, Any] = {
        "occurrences": occurrences,
        "malformed": malformed,
        "repaired": repaired,
        "drained": drained,
        "sinks": {},
    }
    lost = 0
    for p in router.pipelines:
        row = {
            "delivered": int(m.delivered.labels(p.name)._value.get()),
            "filtered": int(m.filtered.labels(p.name)._value.get()),
            "skipped": int(m.skipped.labels(p.name)._value.get()),
            "dead_lettered": int(
                sum(m.dead_lettered.labels(p.name, r)._value.get() for r in DEAD_LETTER_REASONS)
            ),
            "dropped": int(sum(m.dropped.labels(p.name, r)._value.get() for r in SINK_DROP_REASONS)),
        }
        lost += row["dropped"]
        summary["sinks"][p.name] = row
    print(orjson.dumps(summary).decode(), file=sys.stderr)
    return 0 if drained and not lost else 1


# ---- entry ---------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "sinks":
        try:
            code = _sinks(args)
            sys.stdout.flush()  # a pipe is block-buffered: the write that fails may be this one
            return code
        except BrokenPipeError:
            # `eventrouter sinks | head`: the reader went away. Point stdout at /dev/null so that the
            # interpreter's final flush does not raise again, and exit as Python's docs advise.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1
    if args.log_level not in LOG_LEVELS:  # from $EVENTROUTER_LOG_LEVEL, which argparse does not check
        print(
            f"eventrouter: configuration error:\nlog level {args.log_level!r}: use one of {', '.join(LOG_LEVELS)}",
            file=sys.stderr,
        )
        return 2
    setup_logging(args.log_level, args.log_format)
    try:
        if args.command == "run":
            return asyncio.run(_run(args))
        if args.command == "check":
            return asyncio.run(_check(args))
        if args.command == "replay":
            return asyncio.run(_replay(args))
    except ConfigError as exc:
        print(f"eventrouter: configuration error:\n{exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
