"""Command line: ``eventrouter run | sinks | check | replay``.

Exit codes: 0 success, 1 runtime failure (a sink unreachable in ``check``, loss in ``replay``),
2 invalid configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import functools
import itertools
import logging
import math
import os
import re
import secrets
import signal
import socket
import sys
import tempfile
import threading
import traceback
import types
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

import orjson
from pydantic import BaseModel

from eventrouter.app import DISK_RESERVE, Router, RouterSettings, check_stall_timeout, disk_bounds
from eventrouter.appendfile import append_to
from eventrouter.config import ConfigError, RouterConfig, SinkSpec, build_specs, load_yaml, shown_values
from eventrouter.datalock import DataDirInUse
from eventrouter.engine.deadletter import DeadLetter
from eventrouter.engine.pipeline import CUT_OFF_GRACE
from eventrouter.gc_tuning import tune_gc
from eventrouter.leader import LEASE_DURATION_MAX, check_timings
from eventrouter.logs import setup_logging
from eventrouter.metrics import DEAD_LETTER_REASONS, SINK_DROP_REASONS, Metrics
from eventrouter.options import name_matches, redact_url, safe_name
from eventrouter.plugins import PluginError, discover
from eventrouter.record import MalformedEvent, Occurrence, normalise, occurrence_number
from eventrouter.scrub import option_secrets, scrub
from eventrouter.sink import (
    STRAY_CANCEL,
    Outcome,
    OutcomeKind,
    Sink,
    SinkContext,
    aside_bound,
    cancelled_now,
    raised_by_signal,
)
from eventrouter.source.recording import read_recording
from eventrouter.source.watcher import WatchSettings, check_field_selector

__all__ = ["main"]

log = logging.getLogger("eventrouter")


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("text", "json")


def _listen_addr(text: str) -> str:
    """``host:port`` (``[v6]:port``; an empty host listens on every address of both families, IPv4 and
    IPv6), checked before anything starts."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not host:port with a port in 0-65535")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise argparse.ArgumentTypeError(f"{text!r}: an IPv6 address goes in brackets, e.g. [::]:8080")
    return text


_SIZE_UNITS = {"": 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_SIZE_UNITS |= {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def _byte_size(text: str) -> int:
    """Bytes as a number or a Kubernetes quantity (``512Mi``, ``1Gi``, ``2G``)."""
    number, unit = text.strip(), ""
    for suffix in sorted(_SIZE_UNITS, key=len, reverse=True):
        if suffix and number.endswith(suffix):
            number, unit = number[: -len(suffix)], suffix
            break
    try:
        value = int(float(number) * _SIZE_UNITS[unit])
    except (ValueError, OverflowError):  # "inf" too
        raise argparse.ArgumentTypeError(f"{text!r}: expected bytes or a size like 512Mi, 1Gi") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be more than 0")
    return value


def _seconds(text: str) -> float:
    """A duration in seconds: finite and not negative (``nan`` made a drain wait for ever)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected seconds") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a finite number of seconds, 0 or more")
    return value


def _positive_seconds(text: str) -> float:
    """A duration in seconds, finite and more than 0: ``nan``, ``inf`` and ``-1`` were told "0 or more",
    which 0 is not either (review-b N3)."""
    try:
        value = _seconds(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected a finite number of seconds, more than 0"
        ) from None
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be more than 0")
    return value


def _watch_seconds(text: str) -> int:
    """Whole seconds, 1 or more. 0 (the API server picks 30-60 min) outlasted the read timeout on a
    quiet cluster: every watch ended in it, counted as broken, and reconnects backed off to 30 s."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected whole seconds") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be 1 or more")
    return value


def _lease_seconds(text: str) -> float:
    value = _positive_seconds(text)
    if math.ceil(value) > LEASE_DURATION_MAX:  # 1e10 was written to the Lease and refused: no leader
        raise argparse.ArgumentTypeError(
            f"{text!r}: at most {LEASE_DURATION_MAX} seconds (the Lease's leaseDurationSeconds is an int32)"
        )
    return value


_CONFIGMAP_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def _configmap_name(text: str) -> str:
    """A ConfigMap's name as the API server takes one (a DNS-1123 subdomain)."""
    if len(text) > 253 or not _CONFIGMAP_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a ConfigMap name: lower-case letters, digits, '-' and '.', at most 253 characters"
        )
    return text


def _lease_name(text: str) -> str:
    """A Lease's name as the API server takes one (ValidateLeaseName: a DNS-1123 subdomain). Anything
    else was accepted: every create got 422, every replica stood by, Ready, and nobody delivered."""
    if len(text) > 253 or not _CONFIGMAP_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{_shown_name(text)} is not a Lease name: lower-case letters, digits, '-' and '.', at most 253 "
            "characters (the API server refuses any other, and no replica would ever lead)"
        )
    return text


def _namespace_name(text: str) -> str:
    """A namespace's name as the API server takes one (a DNS-1123 label), as ``_namespaces`` checks."""
    if len(text) > 63 or not _NAMESPACE.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{_shown_name(text)} is not a namespace name: lower-case letters, digits and '-', at most 63 "
            "characters"
        )
    return text


class _Once(argparse.Action):
    """A flag that takes one value: given twice, argparse kept the last silently (a second --config
    replaced the first file's sinks, a second --data-dir left the checkpoints of the first unread)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        given: set[str] = namespace.__dict__.setdefault("_given_once", set())
        if self.dest in given:
            raise argparse.ArgumentError(self, "given more than once; it takes one value")
        given.add(self.dest)
        setattr(namespace, self.dest, values)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sink", action="append", default=[], metavar="TYPE:URL?OPTS", help="a sink, repeatable")
    p.add_argument(
        "--config", action=_Once, type=Path, help="YAML file with cluster_name, namespaces and sinks"
    )
    p.add_argument(
        "--data-dir",
        action=_Once,
        type=Path,
        help="checkpoints, spools and dead letters (persistent volume)",
    )
    p.add_argument(
        "--data-dir-max-bytes",
        action=_Once,
        type=_byte_size,
        metavar="SIZE",
        help="the volume's size (bytes, or 512Mi, 1Gi, 2G): each sink's spool and dead letters are bounded "
        "to share it, so the data dir never outgrows it (a kubelet evicts a pod whose emptyDir does)",
    )
    p.add_argument("--cluster-name", action=_Once, help="stamped on every record as `cluster`")
    p.add_argument(
        "--log-level",
        type=str.lower,
        choices=LOG_LEVELS,
        default=os.environ.get("EVENTROUTER_LOG_LEVEL", "info"),
    )
    p.add_argument(
        "--log-format",
        type=str.lower,
        choices=LOG_FORMATS,
        default=os.environ.get("EVENTROUTER_LOG_FORMAT", "text"),
    )


def _selection(p: argparse.ArgumentParser) -> None:
    """What the router watches: `run`'s flags, which `check` validates as `run` does."""
    p.add_argument("--namespace", action="append", default=[], help="watch only these (repeatable)")
    p.add_argument(
        "--field-selector",
        action=_Once,
        default="",
        help="server-side field selector, e.g. type=Warning",
    )


class _Parser(argparse.ArgumentParser):
    """Its errors quote the arguments with a URL's user info, query values and token-like path
    segments masked: an argument it refused (``--sinks=loki:http://…?password=…``, a sink's flag
    with a typo, or an extraArgs item holding a non-breaking space) was printed whole, credential and
    all, into the pod's log."""

    _given: Sequence[str] = ()

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: Any = None
    ) -> tuple[Any, list[str]]:
        self._given = list(sys.argv[1:] if args is None else args)  # a subcommand's: its own part
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        super().error(_masked_args(message, self._given))


_URL_START = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def _masked_args(text: str, given: Sequence[str]) -> str:
    """``text`` with each argument in ``given`` (and an option's ``=value``) as ``_masked_arg`` shows it."""
    quoted = set(given) | {arg.partition("=")[2] for arg in given if arg.startswith("-")}
    for arg in sorted(quoted, key=len, reverse=True):
        if arg and (masked := _masked_arg(arg)) != arg:
            for given_as in dict.fromkeys((arg, arg.lower())):  # --log-level's type=str.lower quotes it so
                text = text.replace(repr(given_as), repr(masked)).replace(given_as, masked)
    return text


def _masked_arg(arg: str) -> str:
    """An argument as an error may quote it: a URL in it as ``redact_url`` shows one (also past a raw
    ``/`` or ``?`` in a password, where urlsplit ends the user info), a ``TYPE:?key=value``'s values,
    any other value of a credential's shape as ``shown_values`` shows one."""
    if found := _URL_START.search(arg):
        scheme, _, rest = arg[found.start() :].partition("://")
        if "@" in rest:
            rest = "***@" + rest.rpartition("@")[2]
        return arg[: found.start()] + redact_url(f"{scheme}://{rest}")
    head, sep, query = arg.partition("?")
    if sep:
        return head + redact_url(f"//?{query}")
    # Else a value (not a whole --option=value, whose value is masked on its own) by config's rule:
    # `--metrics-addr='Bearer S3cret'` or `--data-dir-max-bytes=token:S3cret` was quoted whole.
    if arg.startswith("-") and "=" in (name := arg.lstrip("-")):  # an option argparse does not know
        return arg[: len(arg) - len(name)] + shown_values([name])  # (`--password=S3cret`): undashed
    return shown_values([arg])  # also a value led by a dash (`--log-level=-token:S3cret`)


def _parser() -> argparse.ArgumentParser:
    # Not from __doc__: `python -OO` (or PYTHONOPTIMIZE=2) strips docstrings.
    parser = _Parser(
        prog="eventrouter", description="Route every Kubernetes Event occurrence to pluggable sinks."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="watch the cluster's events and route them to the sinks")
    _common(run)
    _selection(run)
    run.add_argument(
        "--kubeconfig", action=_Once, help="kubeconfig file (default: in-cluster, then $KUBECONFIG)"
    )
    run.add_argument("--context", action=_Once, help="kubeconfig context")
    run.add_argument(
        "--metrics-addr",
        type=_listen_addr,
        default=":8080",
        help="host:port for /metrics /healthz /readyz (default :8080: an empty host listens on every "
        "address of both families, IPv4 and IPv6; 0.0.0.0 or [::] listens on one)",
    )
    run.add_argument("--shutdown-timeout", type=_seconds, default=25.0, help="seconds to drain on SIGTERM")
    run.add_argument(
        "--watch-timeout",
        type=_watch_seconds,
        default=290,
        help="server-side watch timeoutSeconds (1 or more); the client's read timeout is 40 s longer "
        "(at least 330 s)",
    )
    run.add_argument(
        "--stall-timeout",
        type=_positive_seconds,
        default=600.0,
        help="/healthz fails after this long without progress (at least --watch-timeout + 40 s)",
    )
    run.add_argument(
        "--reload-interval",
        type=_seconds,
        default=5.0,
        help="seconds between checks of the files sink options name (file: secrets, certificates, "
        "templates); a changed one rebuilds its sink. 0: read them only at start",
    )
    run.add_argument("--leader-elect", action="store_true", help="only the Lease holder watches and delivers")
    run.add_argument(
        "--leader-elect-namespace", type=_namespace_name, default=os.environ.get("POD_NAMESPACE", "default")
    )
    run.add_argument("--leader-elect-name", type=_lease_name, default="eventrouter", help="Lease name")
    run.add_argument("--leader-elect-lease-duration", type=_lease_seconds, default=15.0, help="seconds")
    run.add_argument("--leader-elect-renew-deadline", type=_positive_seconds, default=10.0, help="seconds")
    run.add_argument("--leader-elect-retry-period", type=_positive_seconds, default=2.0, help="seconds")
    run.add_argument(
        "--checkpoint-configmap",
        action=_Once,
        type=_configmap_name,
        help="keep checkpoints in this ConfigMap (namespace: $POD_NAMESPACE) instead of --data-dir",
    )
    run.add_argument(
        "--checkpoint-seed-configmap",
        action=_Once,
        type=_configmap_name,
        metavar="NAME",
        help="take over the checkpoint this ConfigMap holds (namespace: $POD_NAMESPACE), as "
        "--checkpoint-configmap wrote it, so that moving from --checkpoint-configmap to --data-dir delivers "
        "nothing twice, also onto a data dir kept from before: read (get) at each start; it starts an empty "
        "--data-dir's checkpoint and is merged into one the data dir holds (the higher number of each entry) "
        "unless the data dir took that state (uid, resourceVersion) last; a failed read is tried at the next "
        "start; never written",
    )
    run.add_argument(
        "--checkpoint-flush-interval",
        type=_positive_seconds,
        default=1.0,
        help="seconds between writes of the checkpoint ConfigMap (at least 1 s per 64 KiB of it: each "
        "write is a revision in etcd); what was delivered since the last write comes again after a "
        "leader is killed",
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
    _selection(check)
    check.add_argument(
        "--offline",
        action="store_true",
        help="validate the configuration and build every sink without contacting any (CI, a rendered "
        "chart); exit 0 or 2 (1: a sink whose aclose() did not end within its send_timeout)",
    )

    replay = sub.add_parser(
        "replay",
        help="route a `kubectl get events -A -o json`, a JSON-lines watch recording or a dead-letter file",
    )
    _common(replay)
    # As `run` takes them (argparse's abbreviations of --sink): ambiguous here beside --sink-flags,
    # so a router's args copied into a replay exited 2.
    replay.add_argument("--si", "--sin", dest="sink", action="append", help=argparse.SUPPRESS)
    replay.add_argument("file", help="file to read, - for stdin")
    replay.add_argument("--timeout", type=_seconds, default=120.0, help="seconds to wait for delivery")
    replay.add_argument(
        "--sink-flags",
        action=_Once,
        type=Path,
        metavar="FILE",
        help="--sink values, one a line (blank lines and # comments skipped), taken before any --sink: "
        "the router's own, as the chart renders sinks.flags into /etc/eventrouter/sink-flags",
    )
    replay.add_argument(
        "--to",
        action="append",
        default=[],
        metavar="NAME",
        help="send dead letters to this configured sink (repeatable), not to the sink that refused them "
        "(say, that sink renamed); without it the letters of a sink not configured here are not sent (exit 2)",
    )
    return parser


# ---- configuration -------------------------------------------------------------------------------


def _load(args: argparse.Namespace) -> tuple[RouterConfig, list[SinkSpec]]:
    cfg = load_yaml(args.config) if args.config else RouterConfig()
    specs = build_specs(args.sink, cfg.sinks, yaml_source=str(args.config or "config"))
    _refuse_shared_files(specs)
    return cfg, specs


def _refuse_shared_files(specs: Sequence[SinkSpec]) -> None:
    """Two sinks of one router appending to one file (a sink written twice with different filters)
    passed as valid. Each sink's cut-back of a failed write or fsync assumes the end of the file is its
    own, and each rotates the file under the other. A sink class names the file it owns with
    ``owned_file(options)`` (the file sink does); two the same after resolving links exit 2."""
    owners: dict[str, SinkSpec] = {}
    rotated: dict[str, tuple[str, SinkSpec]] = {}  # P.1 … P.max_files: whose rotation renames there
    for spec in specs:
        owned = getattr(spec.sink_cls, "owned_file", None)
        path = owned(spec.options) if callable(owned) else None
        if path is None:
            continue
        key = os.path.realpath(path)
        other = owners.setdefault(key, spec)
        if other is not spec:
            raise ConfigError(
                f"{spec.source}: sink {_shown_name(spec.name)} writes {key}, as sink {_shown_name(other.name)} ({other.source}) "
                "does: two sinks on one file cut back and rotate each other's lines; give each its own "
                "file, or use one sink"
            )
        # A sink on x.jsonl.1 beside one on x.jsonl: the first's rotation renames over the second's file.
        if getattr(spec.options, "max_bytes", 0):  # renamed beside the name given (a link's own)
            beside = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(path))), path.name)
            for n in range(1, int(getattr(spec.options, "max_files", 0)) + 1):
                rotated.setdefault(f"{beside}.{n}", (key, spec))
    for key, spec in owners.items():
        if key in rotated:
            base, other = rotated[key]
            raise ConfigError(
                f"{spec.source}: sink {_shown_name(spec.name)} writes {key}, where sink {_shown_name(other.name)} "
                f"({other.source}) keeps the rotated files of {base}: its rotation renames over this "
                "sink's file; give each a file of its own name"
            )


def _could_write_data_dir(path: Path) -> Path:
    """What ``_writable_data_dir`` checks, without making anything (``check``, as for the file sink in
    item 199): the data dir, or its nearest existing folder, must be a folder this process may write."""
    folder = path
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    why = (
        None
        if folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)
        else (os.strerror(errno.ENOTDIR) if not folder.is_dir() else os.strerror(errno.EACCES))
    )
    if why is not None:
        where = "" if folder == path else f" ({folder} is where it would be made)"
        raise ConfigError(
            f"--data-dir {path}: cannot write there ({why}){where}; mount a writable volume there"
            " or leave --data-dir out"
        )
    return path


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


_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")  # a DNS-1123 label


def _namespaces(values: Sequence[str]) -> list[str]:
    """Namespace names as the API server takes them. Anything else listed an empty namespace
    without an error: the router was ready and healthy and delivered nothing."""
    names: list[str] = []
    for ns in values:
        if len(ns) > 63 or not _NAMESPACE.fullmatch(ns):
            several = "," in ns or " " in ns.strip()
            hint = " (one per --namespace, repeated, or a list under `namespaces:`)" if several else ""
            # Shown as config's values are (`_shown_name`): a flag or token pasted in was printed whole.
            raise ConfigError(
                f"namespace {_shown_name(ns)} is not a namespace name: lower-case letters, digits and '-', "
                f"at most 63 characters{hint}"
            )
        if ns not in names:  # the same one twice started two watches of it
            names.append(ns)
    return names


def leader_identity(environ: Mapping[str, str]) -> str:
    """The Lease holder name: unique per process, as ``LeaderElector`` requires. The pod's name alone
    let two processes lead at once when a StatefulSet's replacement pod (same name) started while the
    old one still ran (a force-deleted pod on a lost node). With ``POD_UID`` (the chart sets it) a
    container restarted in its pod keeps its identity and takes its own lease back at once; without
    it a random part makes each process its own, as client-go does."""
    name = environ.get("POD_NAME") or socket.gethostname()
    return f"{name}_{environ.get('POD_UID') or f'{os.getpid()}-{secrets.token_hex(4)}'}"


def _settings(args: argparse.Namespace, cfg: RouterConfig, *, make: bool = True) -> RouterSettings:
    selector = getattr(args, "field_selector", "") or cfg.field_selector
    try:
        check_field_selector(selector)
    except ValueError as exc:
        raise ConfigError(f"field selector {selector!r}: {exc}") from None
    seed = getattr(args, "checkpoint_seed_configmap", None)
    if seed is not None and getattr(args, "checkpoint_configmap", None) is not None:
        raise ConfigError(
            "--checkpoint-seed-configmap and --checkpoint-configmap exclude each other: with "
            "--checkpoint-configmap the checkpoint is kept in that ConfigMap; --checkpoint-seed-configmap "
            "only starts a --data-dir checkpoint from one. Leave one of them out"
        )
    data_dir = args.data_dir or (Path(cfg.data_dir) if cfg.data_dir else None)
    if data_dir is not None:
        data_dir = _writable_data_dir(data_dir) if make else _could_write_data_dir(data_dir)
    if seed is not None and data_dir is None:
        raise ConfigError("--checkpoint-seed-configmap needs --data-dir: it starts the data dir's checkpoint")
    if getattr(args, "leader_elect", False):
        try:  # as client-go refuses them, before anything starts, naming the options
            check_timings(
                args.leader_elect_lease_duration,
                args.leader_elect_renew_deadline,
                args.leader_elect_retry_period,
                (
                    "--leader-elect-lease-duration",
                    "--leader-elect-renew-deadline",
                    "--leader-elect-retry-period",
                ),
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    watch_timeout = getattr(args, "watch_timeout", 290)
    stall_timeout = getattr(args, "stall_timeout", 600.0)
    try:
        check_stall_timeout(watch_timeout, stall_timeout, ("--stall-timeout", "--watch-timeout"))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return RouterSettings(
        cluster_name=args.cluster_name or cfg.cluster_name,
        namespaces=_namespaces(getattr(args, "namespace", []) or cfg.namespaces),
        data_dir=data_dir,
        data_dir_max_bytes=args.data_dir_max_bytes,
        kubeconfig=getattr(args, "kubeconfig", None),
        context=getattr(args, "context", None),
        metrics_addr=getattr(args, "metrics_addr", None),
        shutdown_timeout=getattr(args, "shutdown_timeout", 25.0),
        stall_timeout=getattr(args, "stall_timeout", 600.0),
        reload_interval=getattr(args, "reload_interval", 5.0),
        leader_elect=getattr(args, "leader_elect", False),
        leader_namespace=getattr(args, "leader_elect_namespace", "default"),
        leader_name=getattr(args, "leader_elect_name", "eventrouter"),
        leader_identity=leader_identity(os.environ),
        lease_duration=getattr(args, "leader_elect_lease_duration", 15.0),
        renew_deadline=getattr(args, "leader_elect_renew_deadline", 10.0),
        retry_period=getattr(args, "leader_elect_retry_period", 2.0),
        checkpoint_configmap=getattr(args, "checkpoint_configmap", None),
        checkpoint_flush_interval=getattr(args, "checkpoint_flush_interval", 1.0),
        checkpoint_namespace=os.environ.get("POD_NAMESPACE", "default"),
        checkpoint_seed_configmap=seed,
        watch=WatchSettings(
            field_selector=selector,
            watch_timeout=watch_timeout,
        ),
    )


_TYPE_TERM = re.compile(r"type(!=|==|=)((?:[^\\,]|\\.)*)")


def _selected_types(selector: str) -> tuple[set[str] | None, set[str]]:
    """The Event types a field selector lets through: (only these, or None for any; never these)."""
    only: set[str] | None = None
    never: set[str] = set()
    for term in re.split(r"(?<!\\),", selector):
        m = _TYPE_TERM.fullmatch(term)
        if m is None:
            continue
        value = re.sub(r"\\(.)", r"\1", m.group(2))
        if m.group(1) == "!=":
            never.add(value)
        else:
            only = {value} if only is None else only & {value}
    return only, never


def _refuse_selections_that_keep_nothing(
    args: argparse.Namespace, settings: RouterSettings, specs: Sequence[SinkSpec]
) -> None:
    """A sink whose own filter keeps nothing of what the router watches passed `check` and ran
    "healthy", delivering nothing, counted only as filtered: a sink's ``namespaces=`` none of the
    router's namespaces, its ``exclude_namespaces=`` all of them, or a ``type=`` field selector
    without the types its filter keeps (an alert robot keeps Warning by default). Refused naming the
    sink and both options (``FilterOptions`` refuses the contradictions within one sink)."""
    watched = settings.namespaces
    ns_option = "--namespace" if getattr(args, "namespace", []) else "namespaces: in the config"
    selector = settings.watch.field_selector
    sel_option = (
        "--field-selector" if getattr(args, "field_selector", "") else "field_selector: in the config"
    )
    only, never = _selected_types(selector)
    for spec in specs:
        keep, drop = spec.filter.namespaces, spec.filter.exclude_namespaces
        if watched and keep and not any(name_matches(keep, ns) for ns in watched):
            raise ConfigError(
                f"{spec.source}: option 'namespaces' ({shown_values(keep)}) keeps none of the namespaces "
                f"{ns_option} watches ({','.join(watched)}): the sink would receive nothing"
            )
        if watched and drop and all(name_matches(drop, ns) for ns in watched):
            raise ConfigError(
                f"{spec.source}: option 'exclude_namespaces' ({shown_values(drop)}) drops every namespace "
                f"{ns_option} watches ({','.join(watched)}): the sink would receive nothing"
            )
        # As engine/filter.py: level=Warning keeps Warning of the types listed (all when none are).
        types = set(spec.filter.types)
        if spec.filter.level == "Warning":
            types = (types & {"Warning"}) if types else {"Warning"}
        if types and not {t for t in types if (only is None or t in only) and t not in never}:
            given = {"level", "type", "types"} & set(spec.entry)
            # The types as config.py's errors show them: a flag or token pasted in is no type, but kept.
            how = (
                f"types={shown_values(spec.filter.types)}"
                if spec.filter.types
                else "level=Warning" + ("" if given else f", the {spec.type} sink's default")
            )
            raise ConfigError(
                f"{spec.source}: option '{'types' if spec.filter.types else 'level'}' ({how}) keeps "
                f"{shown_values(sorted(types))} events only, and {sel_option} ({selector}) lets none of "
                "them through: the sink would receive nothing"
            )


# ---- run -----------------------------------------------------------------------------------------


async def _run(args: argparse.Namespace) -> int:
    cfg, specs = _load(args)
    settings = _settings(args, cfg)
    _refuse_selections_that_keep_nothing(args, settings, specs)
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
        # Its default action ended the process at once: no drain, no spool, no checkpoint.
        loop.add_signal_handler(signal.SIGHUP, router.reload_files)
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
        print(
            f"unknown sink {_shown_name(args.name)}; installed: {', '.join(sorted(plugins))}", file=sys.stderr
        )
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
    # What `run` refuses (namespaces, field selector, an unwritable data dir) passed `check`; a check
    # makes no data dir, though (`check --offline` in CI left the folders behind).
    settings = _settings(args, cfg, make=False)
    _refuse_selections_that_keep_nothing(args, settings, specs)
    if not specs:
        raise ConfigError("no sinks configured")
    failed = 0
    # Which sinks `run` gives a disk spool: what a sink keeps set aside depends on it.
    disk = disk_bounds(specs, settings.data_dir_max_bytes) if settings.data_dir is not None else {}
    for spec in specs:
        context = SinkContext(
            name=spec.name,
            cluster=settings.cluster_name,
            data_dir=None,
            logger=logging.getLogger(f"eventrouter.sink.{spec.name}"),
            send_timeout=spec.pipeline.send_timeout,
            retry_wait_max=spec.pipeline.retry_wait_max,
            aside_max_events=aside_bound(
                spec.pipeline,
                spooled=disk.get(spec.name, (0, 0))[0] > 0,
                defer=getattr(spec.sink_cls, "defer_retries", False),
            ),
        )
        sink = spec.build(context)
        # What the sink keeps, the defaults named: a filter keeping little is seen before it runs.
        shown = spec.describe() + (f"  filter: {kept}" if (kept := spec.filter_text()) else "")
        try:
            why = None if args.offline else await _checked(spec, sink)
        finally:
            # Also at a Ctrl-C (the check cancelled): an HTTP client's session left open was an
            # asyncio ERROR at exit, a producer's connection never closed. After the close: one that
            # does not end fails the check too (a router's stop waits for it).
            unclosed = await _close_checked(spec, sink)
        why = why or unclosed
        if why is not None:
            failed += 1
            print(f"FAIL  {spec.describe()}: {why}")
        else:
            print(f"{'valid' if args.offline else 'ok   '} {shown}")
    return 1 if failed else 0


class _TimedOut(Exception):
    """A sink's call did not end within its bound: ``_bounded``'s own, not a TimeoutError the call
    raised (a client's connect timeout, at once), which is the sink's answer with its own text."""


class _Overran(Exception):
    """A sink's call went on after its cancellation (it swallows it): left running; the command ends
    without it (``_run_async``)."""


async def _bounded(call: Coroutine[Any, Any, Any], seconds: float, name: str) -> None:
    """Await a sink's ``call`` for ``seconds`` (``_TimedOut`` after), in a task of its own: awaited
    within ``asyncio.timeout``, a check() that swallows its cancellation held `check` for ever.
    ``_Overran`` when it goes on ``CUT_OFF_GRACE`` s (at most; as a send) after its cancellation."""
    task = asyncio.create_task(_outcome(call), name=name)
    try:
        done, _ = await asyncio.wait({task}, timeout=seconds)
        if not done:
            task.cancel()
            grace = max(1.0, min(CUT_OFF_GRACE, seconds))
            done, _ = await asyncio.wait({task}, timeout=grace)
            if not done:
                raise _Overran(
                    f"did not stop when cancelled (still running {grace:g}s later: it swallows its cancellation)"
                )
            with contextlib.suppress(BaseException):
                task.exception()  # whatever it made of its cancellation: it ran out of time
            raise _TimedOut
    except asyncio.CancelledError:
        task.cancel()  # Ctrl-C: not left running unawaited
        raise
    raised = task.result()  # a stray CancelledError comes out here
    if raised is not None:
        raise raised  # what it raised, as awaited directly


async def _outcome(call: Coroutine[Any, Any, Any]) -> BaseException | None:
    """What ``call`` raised, as a value: a task lets a SystemExit or KeyboardInterrupt out of the event
    loop itself (a plugin's ``sys.exit(0)`` in check() ended `check` with exit 0)."""
    try:
        await call
    except asyncio.CancelledError:
        raise
    except BaseException as exc:
        return exc
    return None


async def _checked(spec: SinkSpec, sink: Sink[Any]) -> str | None:
    """Why ``sink.check()`` failed (None: it passed), within the sink's ``send_timeout``."""
    timeout = spec.pipeline.send_timeout
    try:
        await _bounded(sink.check(), timeout, f"check:{spec.name}")
    except asyncio.CancelledError:
        if cancelled_now():
            raise
        return f"check() {STRAY_CANCEL}"  # let out by the sink: a traceback named no sink before
    except _TimedOut:
        return f"check() did not finish within send_timeout {timeout:g}s"
    except _Overran as exc:
        return f"check() did not finish within send_timeout {timeout:g}s, and {exc}"
    except BaseException as exc:
        # Also a SystemExit or GeneratorExit of the sink's: it ended the command naming nothing.
        if raised_by_signal(exc):
            raise
        said = _text(exc) or type(exc).__name__
        if isinstance(exc, TimeoutError) and not _text(exc):  # the sink's own bound, shorter than ours
            said = f"check() timed out (a TimeoutError of the sink's own, within send_timeout {timeout:g}s)"
        if not isinstance(exc, Exception):
            said = f"{type(exc).__name__}: {said}"
        # The text a plugin's library made may quote the sink's secrets (a token in a URL).
        return scrub(said, option_secrets(spec.options))
    return None


def _text(exc: BaseException) -> str:
    """``str(exc)``, also for a plugin's exception whose ``__str__`` raises."""
    try:
        return str(exc)
    except Exception:
        return ""


async def _close_checked(spec: SinkSpec, sink: Sink[Any]) -> str | None:
    """What a check built is closed; its failure to close is not the check's answer, but a close that
    does not end within ``send_timeout`` is (it held `check` for ever, as it holds a router's stop)."""
    timeout = spec.pipeline.send_timeout
    try:
        await _bounded(sink.aclose(), timeout, f"aclose:{spec.name}")
    except asyncio.CancelledError:
        if cancelled_now():
            raise
    except _TimedOut:  # a TimeoutError of the close's own ended it: no failure of the check
        return f"aclose() did not finish within send_timeout {timeout:g}s"
    except _Overran as exc:
        return f"aclose() did not finish within send_timeout {timeout:g}s, and {exc}"
    except BaseException as exc:
        if raised_by_signal(exc):
            raise
    return None


# ---- replay --------------------------------------------------------------------------------------


def _dead_letter_replay(
    origin: tuple[str, Any],
    specs: list[SinkSpec],
    settings: RouterSettings,
    path: str,
    route: Callable[[str], frozenset[str] | None] | None = None,
) -> tuple[list[SinkSpec], RouterSettings]:
    """A dead-letter file (``origin``: the sink and cluster of its first entry) goes back to the sink
    that refused it (the others have those occurrences already), or to the sinks ``--to`` names; a
    sink not configured here is a configuration error (``route`` says where letters go), without
    the data dir (its checkpoint counts them as done; ``_DeadLetterReplay`` keeps what this replay
    needs beside the file), and stamped with its records' cluster name unless one is given. Handed
    on oldest first (a sink that wants time order), the file waits in a temporary file in the data
    dir or beside the dead letters, on their volume: not in /tmp, which in the chart's pod is a small
    emptyDir that a large file would get the pod evicted for."""
    if settings.watch.relist_dir is None and (settings.data_dir is not None or path != "-"):
        spare = str(settings.data_dir) if settings.data_dir is not None else str(Path(path).resolve().parent)
        settings.watch = dataclasses.replace(settings.watch, relist_dir=spare)
    sink, cluster = origin
    if not settings.cluster_name and cluster:
        settings.cluster_name = str(cluster)
    names = (route or _destinations([spec.name for spec in specs], ()))(sink)
    if names is None:
        raise ConfigError(_not_configured(sink, [spec.name for spec in specs]))
    specs = [spec for spec in specs if spec.name in names]
    # The names as its refusals show them (`_shown_list`): a recorded name may have a credential's shape.
    if names == {sink}:
        log.info("replay: dead letters of %s: sending them to that sink only", _shown_list([sink]))
    else:
        log.info(
            "replay: dead letters of %s: sending them to %s (--to)",
            _shown_list([sink]),
            _shown_list(sorted(names)),
        )
    if settings.data_dir is not None:
        log.info("replay: the data dir's checkpoint is not used for dead letters (it counts them as done)")
        settings.data_dir = None
    return specs, settings


_REFUSED_NAME = re.compile(r"\.refused-[^/]*\.jsonl$")
"""The part a file of letters refused again adds to its input's name, taken off when that file is
replayed in turn (its letters refused again go back into it, not into ``….refused-a.jsonl.refused-a.jsonl``)."""

_NO_ROTATION = 1 << 62
"""A replay's file of letters refused again is never rotated: it holds at most what its input holds,
and a rotation would discard some of them."""

_KEYS_PER_LINE = 100
"""Keys a log line names: ~5 KB, below a container runtime's line split (16 KiB)."""


def _dead_letter_folder(path: str, data_dir: Path | None) -> tuple[Path | None, str]:
    """Where a dead-letter replay keeps its files, and the name they start with: beside the file
    replayed; for stdin, in the data dir's dead-letter folder (none without a data dir)."""
    if path != "-":
        given = Path(path).absolute()
        return given.parent, _REFUSED_NAME.sub("", given.name)
    return (data_dir / "deadletter" if data_dir is not None else None), "stdin"


def _live_data_dir(folder: Path | None) -> Path | None:
    """The data dir whose dead-letter folder ``folder`` is (``<data-dir>/deadletter`` beside the
    ``lock`` file a router takes), or None: a replay writing there takes room on the router's volume."""
    if folder is not None and folder.name == "deadletter" and (folder.parent / "lock").is_file():
        return folder.parent
    return None


def _bytes_under(path: Path) -> int:
    """What the files under ``path`` take on disk, as ``du`` (and a kubelet measuring an emptyDir) counts."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


_FREE_KEPT = 0.1
"""Of a volume, what a replay leaves free: a kubelet evicts pods when its node's disk has less than a
tenth free (``nodefs.available<10%``, its default), and an emptyDir is on that disk."""


class _Room:
    """What a dead-letter replay may write into a router's data dir: its volume's free space less a
    tenth of the volume, and with ``--data-dir-max-bytes`` (the router's: an emptyDir's limit does
    not show in its free space) also that budget less what the data dir holds and the router's
    reserve for its checkpoints and a relist's sorted file. Each replay that failed alike left a full
    copy of its input there before, outside the budget: past an emptyDir's limit the kubelet evicts
    the pod, and the emptyDir goes, with the spools and the dead letters."""

    def __init__(self, data_dir: Path, budget: int | None) -> None:
        fs = os.statvfs(data_dir)
        left = fs.f_bavail * fs.f_frsize - int(fs.f_blocks * fs.f_frsize * _FREE_KEPT)
        if budget is not None:
            left = min(left, budget - _bytes_under(data_dir) - int(budget * DISK_RESERVE))
        self.data_dir = data_dir
        self.budget = budget
        self.left = max(0, left)
        self.taken = 0

    def take(self, size: int) -> bool:
        if self.taken + size > self.left:
            return False
        self.taken += size
        return True

    def __str__(self) -> str:
        within = (
            f"--data-dir-max-bytes {self.budget} less what the data dir holds and the router's "
            f"{DISK_RESERVE:.0%} reserve, and "
            if self.budget
            else ""
        )
        return (
            f"{(self.left - self.taken) / 2**20:.1f} MiB left for a replay in the data dir {self.data_dir} "
            f"({within}its volume's free space less {_FREE_KEPT:.0%} of it)"
        )


class _Ledger:
    """``<folder>/<sink>.replayed``: the keys (``uid/occurrence``) the sink accepted from replays of
    dead letters in that folder, a line each, appended as it answers OK for them. A replay of any file
    there skips them: the same file run again after an exit 1, ``.1`` after ``.jsonl``, or a file of
    letters refused again. A key names one occurrence in whichever file it is. Remove the file to send
    everything again."""

    def __init__(self, path: Path, sink: str) -> None:
        self.path = path
        self.sink = sink
        self.keys: set[str] = set()
        self.added = 0
        self.not_written = 0
        self._exists = False
        self._read()

    def _read(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning(
                "replay: cannot read %s (%s): what earlier replays delivered to %s is sent again",
                self.path,
                exc.strerror,
                self.sink,
            )
            return
        self._exists = True
        end = data.rfind(b"\n") + 1
        if end < len(data):
            # A kill during an append left part of a line: "u/1" cut from "u/12" is no key. Cut off;
            # should that fail, the next append glues onto it, and "u/1v/3" is none either.
            with contextlib.suppress(OSError):
                os.truncate(self.path, end)
        for line in data[:end].decode("utf-8", "replace").splitlines():
            key = line.strip()
            if key and not key.startswith("#"):
                self.keys.add(key)

    def add(self, keys: Sequence[str]) -> None:
        # A key with a line break would be read back as other keys (one of them maybe real).
        fresh = [key for key in dict.fromkeys(keys) if key not in self.keys and key.isprintable()]
        if not fresh:
            return
        head = (
            b""
            if self._exists
            else f"# uid/occurrence keys sink {self.sink} accepted from replays of the dead letters in "
            "this folder; `eventrouter replay` of a file here skips them. Remove this file to send "
            "them again.\n".encode()
        )
        try:
            append_to(self.path, head + "".join(f"{key}\n" for key in fresh).encode())
        except OSError as exc:
            if not self.not_written:
                log.error(
                    "replay: cannot write %s (%s): what %s accepts from now on is not recorded, and a "
                    "replay of these dead letters again sends it again",
                    self.path,
                    exc.strerror or exc,
                    self.sink,
                )
            self.not_written += len(fresh)
            return
        self._exists = True
        self.keys.update(fresh)
        self.added += len(fresh)


class _Refused(DeadLetter):
    """The letters one sink refuses again (or gives up) in a dead-letter replay, in a file of their
    own beside the input, one per input and sink: ``<input>.refused-<sink>.jsonl``, appended to
    neither the file replayed nor the live router's. Written to ``….tmp`` while the replay runs and
    renamed over the previous one at its end, so it holds the letters the last run that was refused
    any got refused, with their new reasons: a copy (the input holds every letter not in the ledger).
    Each run wrote a new full copy before, never rotated nor removed, in the live data dir."""

    def __init__(self, path: Path | None, sink: str, outstanding: set[str], room: _Room | None) -> None:
        self.final = path
        running = path.with_name(path.name + ".tmp") if path is not None else None
        super().__init__(running, sink=sink, max_bytes=_NO_ROTATION)
        if running is not None:
            with contextlib.suppress(OSError):
                running.unlink(missing_ok=True)  # left by a replay that was killed
        self.outstanding = outstanding
        self.room = room
        self.kept = 0
        self.unkept = 0  # refused, and the file could not take them (named in the log)
        self.left_as_it_was = False  # the input was this file, and it was not replaced

    def write(self, items: Sequence[tuple[Occurrence, str]]) -> bool:
        for occ, _ in items:
            self.outstanding.discard(occ.key)  # known, and counted as dead-lettered
        written = super().write(items)
        if self.path is not None:
            if written:
                self.kept += len(items)
            else:
                self.unkept += len(items)
        return written

    def _write(self, path: Path, lines: list[bytes]) -> None:
        data = b"".join(lines)
        if self.room is not None and not self.room.take(len(data)):
            raise OSError(errno.ENOSPC, f"no room: {self.room}")
        append_to(path, data)

    def finish(self, *, whole: bool, given: Path | None) -> Path | None:
        """At the end of the run: where this run's letters refused again are (None: none were kept).
        ``whole``: every letter of the input was read and accepted or refused (and kept)."""
        running, final = self.path, self.final
        if running is None or final is None or not self.kept:
            if running is not None:
                with contextlib.suppress(OSError):
                    running.unlink(missing_ok=True)
            return None
        if final == given and not whole:
            # That very file replayed, and not all of it went through: what did not is only in it.
            self.left_as_it_was = True
            with contextlib.suppress(OSError):
                running.unlink()
            return given
        try:
            os.replace(running, final)
        except OSError as exc:
            log.error("replay: cannot rename %s to %s (%s)", running, final, exc.strerror or exc)
            return running
        return final


def _accepted_keys(batch: Sequence[Occurrence], outcomes: object) -> list[str]:
    """The keys of ``batch`` a sink's send answered OK for. Nothing when its answer breaks the
    contract in a way the pipeline retries the batch for, or needs mending (sent again: no loss)."""
    if outcomes is None:
        return [occ.key for occ in batch]
    if not isinstance(outcomes, list | tuple) or len(outcomes) != len(batch):
        return []
    if not all(isinstance(out, Outcome) and isinstance(out.kind, OutcomeKind) for out in outcomes):
        return []
    return [occ.key for occ, out in zip(batch, outcomes, strict=True) if out.kind is OutcomeKind.OK]


def _recording(spec: SinkSpec, sent: Callable[[Sequence[Occurrence], object], None]) -> SinkSpec:
    """``spec`` with a subclass of its sink that tells ``sent`` each send's batch and answer: the
    sink itself in all else (a reload rebuilds the same subclass, ``take_over`` gets its own type)."""
    base = spec.sink_cls

    async def send(self: Sink[Any], batch: Sequence[Occurrence]) -> Sequence[Outcome] | None:
        outcomes = await base.send(self, batch)
        try:
            sent(batch, outcomes)
        except Exception:  # a ledger's bug must not make an accepted batch look failed (sent again)
            log.exception("replay: recording what sink %s accepted failed", _shown_list([spec.name]))
        return outcomes

    def body(ns: dict[str, Any]) -> None:
        ns.update(send=send, __module__=base.__module__, __qualname__=base.__qualname__, __doc__=base.__doc__)

    return dataclasses.replace(spec, sink_cls=types.new_class(base.__name__, (base,), exec_body=body))


class _MixedLetters(Exception):
    """Dead letters of sinks whose letters go to different sinks here, in one input."""


class _DeadLetterReplay:
    """What a replay of dead letters keeps beside its input, so that it can be run again: what a sink
    refuses again (or gives up) goes to its ``_Refused`` file, and what it accepts to its ledger
    (``_Ledger``), which a later replay skips.

    A key goes into the ledger when the sink answered OK for that very occurrence (``sent``: its
    sends' outcomes). Inferred from checkpoint acknowledgements before (uid → n: the numbers up to n
    handed on), it recorded a lower number that the pipeline then skipped as a copy of an accepted
    higher one (the letters go oldest first, and their times ran backwards): never sent, skipped by
    every later replay, with exit 0. ``outstanding`` holds, per sink, the keys handed on to it that it
    had not accepted before, until it accepts or refuses each: what is left once the replay is
    drained was not delivered (exit 1), and a replay again sends it."""

    def __init__(
        self,
        folder: Path | None,
        base: str,
        sinks: Sequence[str],
        *,
        room: _Room | None = None,
        given: Path | None = None,
    ) -> None:
        self.folder = folder
        self.given = given
        self.outstanding: dict[str, set[str]] = {name: set() for name in sinks}
        self.refused: dict[str, _Refused] = {}
        self.ledgers: dict[str, _Ledger] = {}
        for name in sinks:
            path = None
            if folder is not None:
                path = folder / f"{base}.refused-{safe_name(name)}.jsonl"
                self.ledgers[name] = _Ledger(folder / f"{safe_name(name)}.replayed", name)
            self.refused[name] = _Refused(path, name, self.outstanding[name], room)
        self.skipped = dict.fromkeys(sinks, 0)  # in its ledger: accepted by an earlier replay
        self.kept_out = dict.fromkeys(sinks, 0)  # skipped for the others' sake; its filter keeps it out
        self.again = 0
        self.placed: dict[str, Path | None] = {}
        self._sinks = tuple(sinks)
        self._filters: dict[str, Callable[[Occurrence], bool]] = {}
        self._cluster = ""

    def recording(self, spec: SinkSpec) -> SinkSpec:
        """``spec``, its sink telling this replay what it accepts."""
        return _recording(spec, functools.partial(self.sent, spec.name))

    def install(self, router: Router) -> None:
        """Before anything is handed on: each sink's refused letters go to their file."""
        for p in router.pipelines:
            p.deadletter = self.refused[p.name]
            if p.predicate is not None:
                self._filters[p.name] = p.predicate
        self._cluster = router.settings.cluster_name

    def hand_on(self, obj: Any) -> bool:
        """Whether to hand this Event on: not when every sink it goes to (whose filter keeps it)
        accepted it in an earlier replay. A letter that one sink's filter keeps out was in no ledger of
        that sink, so it went to the others again at every run."""
        meta = obj.get("metadata") if isinstance(obj, dict) else None
        uid = meta.get("uid") if isinstance(meta, dict) else None
        if not isinstance(uid, str) or not uid:
            return True  # malformed: counted so by the router
        number = occurrence_number(obj)  # as the tracker numbers it
        key = f"{uid}/{number}"
        receiving = self._receiving(obj, number)
        if receiving is None:
            return True  # malformed: counted so by the router; never given to a sink
        ledgers = self.ledgers
        had = [sink for sink in receiving if sink in ledgers and key in ledgers[sink].keys]
        if had and len(had) == len(receiving):
            for sink in self._sinks:
                if sink in had:
                    self.skipped[sink] += 1
                else:
                    self.kept_out[sink] += 1
            return False
        if had:
            self.again += 1  # accepted by some of the sinks only: the router hands it to all
        for sink in receiving:
            if sink not in had:
                self.outstanding[sink].add(key)
        return True

    def _receiving(self, obj: Any, number: int) -> Sequence[str] | None:
        """The sinks whose filter keeps this Event (None: it cannot be read)."""
        if not self._filters:
            return self._sinks
        try:
            occ = normalise(obj, cluster=self._cluster, number=number)  # as the tracker builds it
        except MalformedEvent:
            return None
        return [sink for sink in self._sinks if (keep := self._filters.get(sink)) is None or keep(occ)]

    def sent(self, sink: str, batch: Sequence[Occurrence], outcomes: object) -> None:
        """A send of ``sink`` returned ``outcomes``: the keys it answered OK for are delivered."""
        keys = _accepted_keys(batch, outcomes)
        if not keys:
            return
        left = self.outstanding[sink]
        for key in keys:
            left.discard(key)
        ledger = self.ledgers.get(sink)
        if ledger is not None:
            ledger.add(keys)

    def finish(self, *, whole: bool) -> None:
        """Once the router stopped: each sink's letters refused again in their file."""
        for sink, refused in self.refused.items():
            self.placed[sink] = refused.finish(whole=whole and not refused.unkept, given=self.given)

    def report(self, sink: str, *, drained: bool) -> dict[str, Any]:
        """Log where this sink's letters went; the summary's fields for it."""
        fields: dict[str, Any] = {}
        refused, ledger, place = self.refused[sink], self.ledgers.get(sink), self.placed.get(sink)
        given = self.given or "the input"
        if place is not None:
            fields["dead_letter_file"] = str(place)
            if refused.left_as_it_was:
                where = f"they are still in {place}, which this replay did not get through: left as it was"
            elif place == self.given:
                where = f"{place} now holds them alone, with the new reasons"
            else:
                where = f"they are in {place} with the new reasons (a copy: {given} holds them too)"
            log.warning(
                "replay: sink %s refused or gave up %d dead letters again: %s; once the cause is fixed, "
                "replay %s again (what was accepted is skipped)",
                sink,
                refused.kept,
                where,
                given,
            )
        if refused.unkept:
            log.warning(
                "replay: %d dead letters sink %s refused or gave up again could not be written to %s "
                "(each is named above): they are still in %s",
                refused.unkept,
                sink,
                refused.final,
                given,
            )
        left = self.outstanding[sink]
        if drained and left:
            fields["not_sent"] = len(left)
            keys = sorted(left)
            for start in range(0, len(keys), _KEYS_PER_LINE):
                part = keys[start : start + _KEYS_PER_LINE]
                log.warning(
                    "replay: sink %s: %d dead letters were handed on but neither accepted nor refused: "
                    "its pipeline took them for copies of an occurrence of their event with a higher "
                    "number that it had accepted first (their times run backwards), or dropped them "
                    "(dropped); they are not recorded as delivered, and a replay of %s again sends "
                    "them: %s",
                    sink,
                    len(part),
                    given,
                    ", ".join(part),
                )
        if ledger is None:
            return fields
        if self.skipped[sink]:
            log.info(
                "replay: %d dead letters skipped: sink %s accepted them in an earlier replay (%s)",
                self.skipped[sink],
                sink,
                ledger.path,
            )
        if self.again and sink == self._sinks[0]:  # said once
            log.info(
                "replay: %d dead letters that some of the sinks accepted in an earlier replay went to "
                "every sink whose filter keeps them again: the router hands each letter to all",
                self.again,
            )
        if ledger.added:
            log.info(
                "replay: sink %s accepted %d dead letters, recorded in %s: a replay of dead letters in %s "
                "skips them",
                sink,
                ledger.added,
                ledger.path,
                ledger.path.parent,
            )
        return fields


def _open_recording(name: str) -> BinaryIO:
    """The file to replay (``-``: stdin), read as the replay goes, a line at a time: short blocking
    reads of a local file, not the whole file in memory."""
    if name == "-":
        return sys.stdin.buffer
    try:
        return Path(name).open("rb")
    except OSError as exc:
        raise ConfigError(f"cannot read {name!r}: {exc.strerror}") from None


class _Lines:
    """The lines of the input, noting whether the last one read ended in a newline (only the last
    line of a file can lack one), where that line began (``tail``: its byte offset and bytes), and how
    many lines there were and began as a dead letter does (``shaped``)."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.ended = True
        self.read = self.count = self.shaped = 0
        self.tail: tuple[int, bytes] | None = None

    def __iter__(self) -> Iterator[bytes]:
        for line in self.stream:
            self.ended = line.endswith(b"\n")
            if not self.ended:
                self.tail = (self.read, line)
            self.read += len(line)
            self.count += 1
            self.shaped += line.startswith(_LETTER_START)
            yield line


class _ReplayInput:
    """The events of a recording for ``Router.replay``, counting the markers ``read_recording`` puts
    between them. The first dead-letter marker (read before the router is built) says where a
    dead-letter file came from. ``letters`` (set for dead letters) drops those accepted before;
    ``destinations`` (likewise) says where the letters of a sink go."""

    def __init__(self, items: Iterator[tuple[str, Any]], lines: _Lines | None = None) -> None:
        self.malformed = self.repaired = 0
        self.lines = lines
        self.torn_end = False  # the last line was not JSON and had no newline
        self.letters: _DeadLetterReplay | None = None
        self.destinations: Callable[[str], frozenset[str] | None] | None = None
        self.configured: Sequence[str] = ()  # the sinks' names, for the error of one not among them
        head: list[tuple[str, Any]] = []
        for item in items:
            head.append(item)
            self._note(item[0])
            if item[0] not in ("MALFORMED", "REPAIRED"):
                break
        self.origin: tuple[str, Any] | None = next((o for k, o in head if k == "DEADLETTER"), None)
        self._head = head
        self._items = items

    def _note(self, kind: str) -> None:
        if kind == "MALFORMED" and self.lines is not None and not self.lines.ended:
            self.torn_end = True

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        other: set[str] = set()
        letters = self.letters
        for n, (kind, obj) in enumerate(itertools.chain(self._head, self._items)):
            if n >= len(self._head):
                self._note(kind)
            if kind == "MALFORMED":
                self.malformed += 1
            elif kind == "REPAIRED":
                self.repaired += 1
            elif kind == "DEADLETTER":
                first = self.origin[0] if self.origin is not None else None
                if obj[0] != first and obj[0] not in other:
                    other.add(obj[0])
                    self._mixed(first, obj[0])
            elif letters is None or kind not in ("ADDED", "MODIFIED", "LIST") or letters.hand_on(obj):
                yield kind, obj

    def _mixed(self, first: str | None, sink: str) -> None:
        """Letters of ``sink`` after those of ``first`` (``cat a.jsonl b.jsonl | eventrouter replay -``):
        all went where ``first``'s go, with exit 0, and ``b``'s keys into ``a``'s ledger. Refused
        unless they go to the same sinks. Dead letters are handed on once all are read: nothing has
        been sent yet."""
        route = self.destinations
        if route is None or first is None:
            return
        ours, theirs = route(first) or frozenset(), route(sink)  # the first's: checked before the start
        if theirs is None:
            raise _MixedLetters(_not_configured(sink, self.configured))
        if ours != theirs:
            raise _MixedLetters(
                f"the input holds dead letters of {_shown_list([first])} and of {_shown_list([sink])}, which "
                f"go to different sinks here ({_shown_list([first])}'s to {_shown_list(sorted(ours))}; "
                f"{_shown_list([sink])}'s to {_shown_list(sorted(theirs))}): "
                "replay the dead letters of each sink on their own (one file at a time), or name the "
                "sinks all of them should go to with --to; nothing was sent"
            )
        log.info(
            "replay: dead letters of %s after those of %s: they go to the same sinks",
            _shown_list([sink]),
            _shown_list([first]),
        )


def _destinations(configured: Sequence[str], to: Sequence[str]) -> Callable[[str], frozenset[str] | None]:
    """Where the dead letters of a sink go: to the sinks ``--to`` names, else to the sink of that name
    (None when it is not configured). They went to every configured sink: in the chart's pod, whose
    --config lacks the sinks of ``sinks.flags``, a webhook's letters went to stdout, exit 0, and the
    documented loop removed the file."""
    every = frozenset(configured)
    if to:
        unknown = [name for name in to if name not in every]
        if unknown:
            raise ConfigError(
                f"--to {_shown_list(unknown[:1])}: no sink of that name is configured here (configured: "
                f"{_shown_list(configured)}); --to names a sink of --sink, --sink-flags or --config"
            )
        chosen = frozenset(to)
        return lambda sink: chosen
    return lambda sink: frozenset((sink,)) if sink in every else None


def _shown_name(name: str) -> str:
    """A sink's name quoted as config errors show it: whole unless it has a credential's shape."""
    return repr(shown_values([name]))


def _shown_list(names: Iterable[str]) -> str:
    """Sink names, comma-separated, each as ``_shown_name`` judges it (unquoted)."""
    return ", ".join(shown_values([name]) for name in names)


def _not_configured(sink: str, configured: Sequence[str]) -> str:
    return (
        f"dead letters of sink {_shown_name(sink)}, which is not configured here (configured: "
        f"{_shown_list(configured) or 'none'}): give the replay that sink as the router has it, its same "
        "--sink flag or --config (in the chart's pod, --sink-flags=/etc/eventrouter/sink-flags holds "
        "the sinks of sinks.flags), or name a configured sink to send them to instead with --to NAME; "
        "nothing was sent"
    )


def _sink_flags(path: Path | None) -> list[str]:
    """The ``--sink`` values in ``--sink-flags``' file: one a line, blank and ``#`` lines skipped."""
    if path is None:
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"--sink-flags: cannot read {str(path)!r}: {why}") from None
    # Each line as the router has it in its arg (a query value may end in a space): not stripped. At
    # a line feed only, as the chart writes them: str.splitlines also broke a value at a form feed,
    # NEL or U+2028, which the chart lets through, and the pieces were refused as other sinks.
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _refuse_without_room(room: _Room | None, path: str) -> str | None:
    """Why a dead-letter file is not replayed in a router's data dir (None: it fits). What the replay
    writes there, at worst: every letter refused again, and the file sorted by time beside it."""
    if room is None or path == "-":
        return None
    try:
        need = 2 * Path(path).stat().st_size
    except OSError:
        return None
    if need <= room.left:
        return None
    return (
        f"replay: {path} may need up to {need / 2**20:.1f} MiB beside it while it is replayed (twice its "
        f"size: the letters refused again, and the file sorted by time), and there are only {room}; a "
        "full volume stops the router writing its spool and dead letters, and an emptyDir past its limit "
        "gets the pod evicted, data dir and all. Make room, or copy the file to another volume and "
        "replay it there; nothing was sent"
    )


class _ReplayRunning(Exception):
    """Another replay holds the lock of the replays of a folder's dead letters to a sink."""


@contextlib.contextmanager
def _replay_lock(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on the folder of the dead letters replayed (the directory itself: no
    file of its own there) for the whole run, taken before any ledger is read: two replays of dead
    letters in one folder to one sink at once each read the ledger at their start, and each sent
    every letter (review-c F2). Replays of one folder take turns whatever their sinks. The kernel
    drops the lock when the process ends, SIGKILL included: nothing left behind blocks the next."""
    unlocked = (
        "another replay of dead letters in that folder at the same time is not refused (each would send "
        "every letter)"
    )
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        yield  # no folder: no ledger either (stdin, a data dir without dead letters yet)
        return
    except OSError as exc:
        log.warning("replay: cannot open %s (%s): %s", folder, exc.strerror or exc, unlocked)
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _ReplayRunning(
                f"another replay of the dead letters in {folder} is running: it holds the lock on that "
                "folder (flock), which this replay could not take; nothing was sent. Two at once would "
                "each send every letter the other sends: wait for it to end, then run this one again "
                "(what it delivered is skipped)"
            ) from None
        except OSError as exc:  # ENOLCK, or NFS, whose locks need a file open to write
            log.warning("replay: cannot lock %s (%s): %s", folder, exc.strerror or exc, unlocked)
        yield
    finally:
        os.close(fd)


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _ReplayStop:
    """SIGINT (Ctrl-C), SIGTERM or SIGHUP stop a replay as --timeout does (review-c F3): nothing more
    is handed on, the sends in flight are stopped as at the drain deadline and answer for each letter
    (what a sink accepted goes into its ledger), the letters refused again are kept, the summary is
    printed, and the exit code is 128 + the signal's number. Before, Ctrl-C cancelled the send in
    flight (what the sink had accepted of it was not recorded, and the next run sent it again) and
    printed no summary; SIGTERM and SIGHUP killed the process. The same signal again, or another one,
    exits at once."""

    def __init__(self) -> None:
        self.signal: signal.Signals | None = None
        self.event = asyncio.Event()
        self.router: Router | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __enter__(self) -> _ReplayStop:
        if threading.current_thread() is threading.main_thread():  # signals reach it only
            self._loop = asyncio.get_running_loop()
            for sig in _STOP_SIGNALS:
                self._loop.add_signal_handler(sig, self._received, sig)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None:
            for sig in _STOP_SIGNALS:
                self._loop.remove_signal_handler(sig)

    def _received(self, sig: signal.Signals) -> None:
        if self.signal is not None:
            _exit_without(
                "the replay's stop",
                f"was under way when {sig.name} came (what the sinks accepted in the sends then in "
                "flight is not recorded: a replay again sends it)",
                128 + sig,
            )
        self.signal = sig
        log.warning(
            "replay: %s: stopping as at --timeout: nothing more is handed on, and what the sinks accept "
            "of the sends in flight is recorded; a second signal exits at once",
            sig.name,
        )
        self.event.set()
        if self.router is not None:
            self.router.halt_replay()

    def watch(self, router: Router) -> None:
        self.router = router
        if self.signal is not None:
            router.halt_replay()

    async def drained(self, router: Router, timeout: float) -> bool:
        """``router.drain(timeout)``, cut short by a signal: then False, and the stop that follows
        does not wait for the queues again (as at --timeout, the sends in flight get their moment)."""
        if self.signal is None:
            draining = asyncio.ensure_future(router.drain(timeout))
            stopped = asyncio.ensure_future(self.event.wait())
            try:
                await asyncio.wait({draining, stopped}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopped.cancel()
            if self.signal is None:
                return draining.result()
            draining.cancel()  # its wait only: the pipelines go on until the stop
            with contextlib.suppress(asyncio.CancelledError):
                await draining
        for p in router.pipelines:
            p.close()
        router.settings.shutdown_timeout = 0
        return False


async def _replay(args: argparse.Namespace) -> int:
    with _ReplayStop() as stop, contextlib.ExitStack() as held:
        try:
            return await _replay_until(args, stop, held)
        except _ReplayRunning as exc:
            print(f"eventrouter: replay: {exc}", file=sys.stderr)
            return 2


def _still_written(name: str) -> bool:
    """Whether a router may still append to this dead-letter file: named as its live file is
    (``<sink>.jsonl``, not a replay's ``.refused-…`` one), or stdin (such a file piped in). A rotated
    (``.jsonl.1``) or taken (``.taken-…``) file is written to no more."""
    if name == "-":
        return True
    path = Path(name)
    return path.suffix == ".jsonl" and _REFUSED_NAME.search(path.name) is None


_LETTER_START = b'{"sink":"'
"""How every line of a dead-letter file begins (``DeadLetter.write``): a line cut by a kill too."""

_FRAGMENT_KEY = re.compile(rb'"key":"([^"\\]{1,300})"')


def _keep_fragment(name: str, offset: int, data: bytes) -> Path | None:
    """The cut last line of a dead-letter file written to no more, kept in ``<file>.torn`` (None: it
    could not be written, and the replay fails as before, nothing lost)."""
    kept = Path(name).absolute()
    kept = kept.with_name(kept.name + ".torn")
    try:
        kept.write_bytes(data)
    except OSError as exc:
        log.error("replay: cannot write %s (%s)", kept, exc.strerror or exc)
        return None
    return kept


async def _replay_until(args: argparse.Namespace, stop: _ReplayStop, held: contextlib.ExitStack) -> int:
    args.sink = [*_sink_flags(args.sink_flags), *args.sink]
    cfg, specs = _load(args)
    if not specs:
        raise ConfigError("no sinks configured")
    metrics = Metrics()
    letters: _DeadLetterReplay | None = None
    with _open_recording(args.file) as stream:
        lines = _Lines(stream)
        try:
            source = _ReplayInput(read_recording(lines), lines)
        except OSError as exc:  # a directory, an unreadable device
            raise ConfigError(f"cannot read {args.file!r}: {exc.strerror}") from None
        settings = _settings(args, cfg)
        settings.metrics_addr = None
        settings.shutdown_timeout = args.timeout
        if settings.namespaces or settings.watch.field_selector:
            # They choose what the API server sends; a recording holds what it sent then.
            log.warning(
                "replay: the configuration's namespaces and field_selector are not applied to a "
                "recording; every object in it is replayed (a sink's own filter, e.g. namespaces= or "
                "level=, selects)"
            )
        recorded = settings.data_dir is not None  # what a recording's replay delivered is skipped again
        if source.origin is None and args.to:
            raise ConfigError(
                f"--to chooses where dead letters go, and {args.file!r} holds none (its first entry is "
                "no dead letter): a recording goes to every configured sink"
            )
        if source.origin is not None:
            folder, base = _dead_letter_folder(args.file, settings.data_dir)
            source.configured = [spec.name for spec in specs]
            route = source.destinations = _destinations(source.configured, args.to)
            specs, settings = _dead_letter_replay(source.origin, specs, settings, args.file, route)
            if folder is not None:  # before any ledger is read, or a refused file's .tmp removed
                held.enter_context(_replay_lock(folder))
            room = None
            if (live := _live_data_dir(folder)) is not None:
                try:
                    room = _Room(live, settings.data_dir_max_bytes)
                except OSError as exc:
                    log.warning("replay: cannot tell the room left in %s: %s", live, exc.strerror or exc)
            if (why := _refuse_without_room(room, args.file)) is not None:
                print(f"eventrouter: {why}", file=sys.stderr)
                return 2
            given = Path(args.file).absolute() if args.file != "-" else None
            letters = source.letters = _DeadLetterReplay(
                folder, base, [spec.name for spec in specs], room=room, given=given
            )
            specs = [letters.recording(spec) for spec in specs]
        router = Router(settings, specs, metrics=metrics)
        stop.watch(router)
        await router.start_pipelines()
        if letters is not None:
            letters.install(router)
        try:
            occurrences, malformed = await router.replay(source, dead_letters=letters is not None)
        except _MixedLetters as exc:
            await router.stop()
            print(f"eventrouter: replay: {exc}", file=sys.stderr)
            return 2
    malformed += source.malformed
    repaired = source.repaired
    if repaired:
        router.metrics.source_repaired.labels("invalid_unicode").inc(repaired)
    drained = await stop.drained(router, args.timeout)
    await router.stop()
    m = router.metrics
    summary: dict[str, Any] = {
        "occurrences": occurrences,
        "malformed": malformed,
        "repaired": repaired,
        "drained": drained,
        "sinks": {},
    }
    lost = refused = 0
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
        if letters is not None:
            # What the pipeline skipped as a copy is no delivery unless the sink had it: `not_sent`.
            row["skipped"] = letters.skipped[p.name]
            row["filtered"] += letters.kept_out[p.name]
        lost += row["dropped"]
        refused += row["dead_lettered"]
        summary["sinks"][p.name] = row
    where = "the input" if args.file == "-" else args.file
    if stop.signal is not None:
        summary["stopped_by"] = stop.signal.name
    if not drained:
        # The stop's own line speaks of a restart and the API server: a replay's rest is in its input.
        log.warning(
            "replay: not everything was delivered %s: what was not is still in %s, and "
            "a replay of it again sends it%s",
            f"within --timeout {args.timeout:g}s" if stop.signal is None else f"before {stop.signal.name}",
            where,
            " (what was delivered is skipped)"
            if (letters is not None and letters.ledgers) or (letters is None and recorded)
            else ", with everything else in it (without --data-dir nothing records what was delivered)",
        )
    # A dead-letter file being appended to (or whose writer was killed mid-line) ends in part of a
    # letter: exit 0 invited deleting the file while that letter was on its way into it.
    torn = letters is not None and source.torn_end
    # A cut last line in a file nothing writes to any more (rotated, taken, copied) is never completed:
    # "replay it again later" failed it for ever, and the documented loop with it (review-c F1). The
    # fragment is kept beside the file and named; the rest is replayed. A file holding only a fragment
    # (no dead-letter head: read as a recording) likewise.
    fragment: Path | None = None
    tail = lines.tail if source.torn_end else None
    if (
        tail is not None
        and (letters is not None or tail[1].startswith(_LETTER_START))
        and not _still_written(args.file)
        and (fragment := _keep_fragment(args.file, *tail)) is not None
    ):
        torn = False
        key = _FRAGMENT_KEY.search(tail[1])
        shown = key.group(1).decode("utf-8", "replace") if key is not None else ""
        summary["torn_last_line"] = {"offset": tail[0], "bytes": len(tail[1]), "kept_in": str(fragment)}
        log.warning(
            "replay: the last line of %s (%d bytes at byte offset %d) is part of a dead letter whose "
            "writer was killed while writing it, and nothing writes to this file any more: it was not "
            "sent, is counted in malformed, and is kept in %s%s. The router had not acknowledged that "
            "letter's batch: after its restart it delivered it, or wrote the letter again, whole, into "
            "its live dead-letter file. The rest of the file was replayed",
            where,
            len(tail[1]),
            tail[0],
            fragment,
            f" (the letter of {shown})" if shown.isprintable() and shown else "",
        )
    not_sent = 0
    if letters is not None:
        outstanding = any(letters.outstanding.values())
        letters.finish(whole=drained and not lost and not outstanding and not malformed and not torn)
        for p in router.pipelines:
            fields = letters.report(p.name, drained=drained)
            not_sent += fields.get("not_sent", 0)
            summary["sinks"][p.name] |= fields
    if torn:
        summary["last_line_incomplete"] = True
        log.warning(
            "replay: the last line of %s is not a whole dead letter (no newline at its end): the router "
            "may be writing it now, or was killed while writing it (it writes that letter again, whole, "
            "when it next gives the occurrence up); replay the file again later%s. A file no router "
            "writes to any more (a copy) is better renamed as the documented procedure takes files: "
            "then its cut last line is kept aside and the rest replayed",
            where,
            " (what was accepted is skipped)" if letters is not None and letters.ledgers else "",
        )
    # A file of dead letters every one of which a kill cut (the rotated file of a router killed during
    # its first append): each fragment was named with its line above; nothing to send, no failure.
    only_cut = letters is None and occurrences == 0 and 0 < lines.count == lines.shaped == malformed
    if only_cut and not torn:
        log.warning(
            "replay: %s holds only parts of dead letters cut short by a kill (%d, each named by its line "
            "above): nothing to send. The router had not acknowledged their batches",
            where,
            malformed,
        )
    print(orjson.dumps(summary).decode(), file=sys.stderr)
    # Something not delivered (dropped, refused by the sink, or never given to it) is no success: a
    # script must see it. Nor is a file of which nothing could be read (a format replay does not know).
    # Letters an earlier replay delivered were read too: a cut letter beside them failed the run again
    # once all the rest was skipped, for ever (review-c F1, the second pass).
    read = occurrences or (
        letters is not None and (any(letters.skipped.values()) or any(letters.kept_out.values()))
    )
    unreadable = malformed > 0 and not read and not only_cut
    failed = lost or refused or not_sent or unreadable or torn
    if stop.signal is not None:
        return 128 + stop.signal
    return 0 if drained and not failed else 1


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
    args.log_format = args.log_format.lower()
    if args.log_format not in LOG_FORMATS:  # from $EVENTROUTER_LOG_FORMAT: a typo gave text logs
        print(
            f"eventrouter: configuration error:\nlog format {args.log_format!r}: use one of "
            f"{', '.join(LOG_FORMATS)}",
            file=sys.stderr,
        )
        return 2
    setup_logging(args.log_level, args.log_format)
    commands = {"run": _run, "check": _check, "replay": _replay}
    return _run_async(commands[args.command](args)) if args.command in commands else 2


SETTLE_SECONDS = 1.0
"""How long the end of a command waits for the tasks still running once it cancelled them, and for
the threads of ``asyncio.to_thread`` before it says that it waits for them."""


def _run_async(command: Coroutine[Any, Any, int]) -> int:
    """``asyncio.run(command)`` and its exit code (2 for a configuration error), except that a task
    still running after its cancellation does not hold the exit: ``asyncio.run`` waited for it for
    ever. Such a task is a sink's call that swallows its cancellation (a send the stop went on
    without, a check() or aclose() that `check` gave up on): it is named, and the process exits at
    once, after everything the stop keeps (spool, checkpoints, the lock's release) was written. So
    does a thread of ``asyncio.to_thread`` still running a sink's blocking call after its task ended
    (the executor's shutdown waited for it)."""
    runner = asyncio.Runner()
    code = 1  # a traceback: an error none of these expected
    try:
        code = runner.run(command)
    except ConfigError as exc:
        print(f"eventrouter: configuration error:\n{exc}", file=sys.stderr)
        code = 2
    except DataDirInUse as exc:
        print(f"eventrouter: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    finally:
        wait = _ExitWait(code, sys.exc_info()[1])
        with wait.ended_by_ctrl_c():
            wait.run(runner)
        runner.close()
    return code


@dataclasses.dataclass
class _ExitWait:
    """The end of a command: what it left running is given a bounded time to end, then left."""

    code: int
    error: BaseException | None  # an unexpected one on its way out, printed if the exit cuts it
    waiting_for: tuple[str, str] = ("the tasks it cancelled", "had not ended yet")

    def run(self, runner: asyncio.Runner) -> None:
        left = runner.run(_settle(SETTLE_SECONDS))
        if left:
            self.exit(
                "a task" if len(left) == 1 else f"{len(left)} tasks",
                "did not end when cancelled: "
                + "; ".join(f"{task.get_name()} ({_waiting_in(task)})" for task in left),
            )
        self.waiting_for = ("the threads of asyncio.to_thread", "still run a blocking call (a sink's)")
        if not runner.run(_threads_ended(CUT_OFF_GRACE)):
            self.exit(
                "the threads of asyncio.to_thread",
                "still run a blocking call (a sink's, whose task was given up)",
            )

    def exit(self, what: str, why: str, code: int | None = None) -> None:
        _exit_without(what, why, self.code if code is None else code, self.error)

    @contextlib.contextmanager
    def ended_by_ctrl_c(self) -> Iterator[None]:
        """A Ctrl-C during the wait ends the process at once (130), naming what it leaves. Without
        this, each ``runner.run`` put back the Runner's SIGINT handler: a second Ctrl-C raised
        KeyboardInterrupt out of the wait, past the exit above, and the interpreter's own exit then
        joined the executor's thread still in a sink's call (hung, two tracebacks)."""
        if threading.current_thread() is not threading.main_thread():
            yield  # signals reach the main thread only
            return

        def ctrl_c(signum: int, frame: types.FrameType | None) -> None:
            what, why = self.waiting_for
            self.exit(what, f"{why}: Ctrl-C ended the wait", 130)

        before = signal.signal(signal.SIGINT, ctrl_c)
        try:
            yield
        finally:
            if before is not None:  # None: not set from Python, and not to be put back from it
                signal.signal(signal.SIGINT, before)


async def _settle(seconds: float) -> list[asyncio.Task[Any]]:
    """Cancel every other task, and return those still running ``seconds`` later."""
    me = asyncio.current_task()
    rest = [task for task in asyncio.all_tasks() if task is not me]
    for task in rest:
        task.cancel()
    if rest:
        await asyncio.wait(rest, timeout=seconds)
    return [task for task in rest if not task.done()]


async def _threads_ended(seconds: float) -> bool:
    """Whether the default executor's threads end within ``seconds`` (``asyncio.run`` joins them),
    saying so when one still runs ``SETTLE_SECONDS`` in (an idle thread ends at once)."""
    shutdown = asyncio.ensure_future(asyncio.get_running_loop().shutdown_default_executor())
    first = min(SETTLE_SECONDS, seconds)
    done, _ = await asyncio.wait({shutdown}, timeout=first)
    if not done:
        log.warning(
            "waiting up to %gs more for the threads of asyncio.to_thread, which still run a blocking "
            "call (a sink's, whose task was given up); Ctrl-C exits now",
            seconds - first,
        )
        done, _ = await asyncio.wait({shutdown}, timeout=seconds - first)
    return bool(done)


def _exit_without(what: str, why: str, code: int, error: BaseException | None = None) -> None:
    """End the process now with ``code``, saying in the log what it does not wait for and why."""
    if error is not None:
        traceback.print_exception(error)  # the error on its way out, which os._exit would not print
    log.error("exiting (code %d) without waiting for %s, which %s", code, what, why)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


_ASYNCIO = os.path.dirname(asyncio.__file__) + os.sep


def _waiting_in(task: asyncio.Task[Any]) -> str:
    """Where ``task`` waits: the file, line and function of its innermost coroutine outside asyncio
    (the sink's code, not the ``Event.wait`` it awaits)."""
    coro: Any = task.get_coro()
    frame = None
    while coro is not None:
        here = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if here is not None and not here.f_code.co_filename.startswith(_ASYNCIO):
            frame = here
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    if frame is None:
        return "where is not known"
    return f"waiting in {frame.f_code.co_qualname} at {frame.f_code.co_filename}:{frame.f_lineno}"


if __name__ == "__main__":
    sys.exit(main())
