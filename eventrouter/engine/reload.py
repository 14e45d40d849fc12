"""A sink rebuilt when a file its options name changes: a rotated credential, certificate or template.

Kubernetes updates a Secret or ConfigMap mounted as a volume in place (an atomic swap of the
``..data`` symlink; not with ``subPath``), and cert-manager renews certificates that way. A value
read once at start would stay the old one until a restart: Loki answers 401 and the sink retries
for ever while its spool fills, Elasticsearch and webhooks dead-letter every event, a client
certificate expires. So the files named by ``file:`` secrets and by file options (``ca_file``,
``cert_file``, ``body_template_file``, …) are checked every few seconds. When one has changed and
reads the same on a second look SETTLE s later (a file being written by hand is not taken half-way),
the sink's options are validated again. If their values (or a file option's content) differ, a new
instance of the sink takes over between two sends (``Pipeline.replace_sink``); its queue, spool and
checkpoint stay, so nothing is lost or sent twice. Options that cannot be read or validated are
logged and counted, and the sink goes on with the options it had.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

from eventrouter.config import QUERY_KEYS, ConfigError, SinkSpec
from eventrouter.engine.pipeline import Pipeline
from eventrouter.metrics import Metrics
from eventrouter.options import file_options
from eventrouter.scrub import Scrubber, option_secrets
from eventrouter.sink import cancelled_now, raised_by_signal

__all__ = ["SETTLE", "SinkReloader", "WatchedState", "watched_files", "watched_state"]

log = logging.getLogger("eventrouter.reload")

SETTLE = 1.0
"""Seconds until a file seen changed is looked at again (and taken if it reads the same)."""

Signature = tuple[int, int, int, int] | None
"""(device, inode, mtime in ns, size) of a file; None while it cannot be read."""


_NAMED_FILE = re.compile(r"(?P<name>[!#$%&'*+.^_`|~0-9A-Za-z-]+)\s*[:=]\s*file:(?P<path>/\S*)")
"""An entry ``Name:file:/path`` (or ``Name=file:/path``): a header whose value is read from a file."""


def watched_files(spec: SinkSpec) -> dict[str, list[str]]:
    """Path → the options that name it: ``file:`` references in the configured options (secrets,
    also in lists and in mappings such as headers) and the values of the model's file options."""
    files: dict[str, list[str]] = {}

    def add(path: str, option: str) -> None:
        options = files.setdefault(path, [])
        if option not in options:
            options.append(option)

    def walk(value: Any, option: str) -> None:
        if isinstance(value, str):
            if value.startswith("file:") and len(value) > 5:
                add(value[5:], option)
            elif named := _NAMED_FILE.fullmatch(value):
                add(named["path"], f"{option}.{named['name']}")
        elif isinstance(value, list | tuple):
            for item in value:
                walk(item, option)
        elif isinstance(value, Mapping):
            for key, item in value.items():
                walk(item, f"{option}.{key}")

    for key, value in spec.entry.items():
        if key not in ("type", QUERY_KEYS):
            walk(value, key)
    for path, name in _file_option_paths(spec).items():
        add(path, name)
    return files


def _file_option_paths(spec: SinkSpec) -> dict[str, str]:
    """Path → the file option (``FilePath`` field) set to it."""
    values = ((getattr(spec.options, name), name) for name in file_options(type(spec.options)))
    return {value: name for value, name in values if isinstance(value, str) and value}


def _contents(spec: SinkSpec) -> dict[str, bytes | None]:
    """The digest of each file option's file: its value, a path, stays the same when it is rotated."""
    return {path: _digest(path) for path in _file_option_paths(spec)}


def _digest(path: str) -> bytes | None:
    try:
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").digest()
    except OSError:
        return None


def _signature(path: str) -> Signature:
    try:
        st = os.stat(path)  # follows symlinks: a swapped ..data directory gives a new inode
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


@dataclasses.dataclass(frozen=True)
class WatchedState:
    """A spec's watched files as its options were read from them: what a sink built from those
    options runs with, whenever it is built."""

    signatures: Mapping[str, Signature]
    contents: Mapping[str, bytes | None]


def watched_state(spec: SinkSpec) -> WatchedState:
    """Take it as soon as the spec is held: a standby builds its sinks when it takes the lease, maybe
    weeks after its options were read, and a file rotated meanwhile was recorded as already applied
    (Loki refused every push until a restart). Signatures before digests: a change between the two
    shows as a new signature at the next check."""
    signatures = {path: _signature(path) for path in watched_files(spec)}
    return WatchedState(signatures, _contents(spec))


class SinkReloader:
    """Watches one sink's files; ``check()`` (every few seconds) rebuilds the sink when they changed.
    ``read``: the files' state when ``spec``'s options were read (``watched_state``); now if not given."""

    def __init__(
        self, spec: SinkSpec, pipeline: Pipeline, metrics: Metrics, read: WatchedState | None = None
    ) -> None:
        self.spec = spec
        self.pipeline = pipeline
        self.files = watched_files(spec)
        self._m = {
            result: metrics.sink_reloads.labels(spec.name, result)
            for result in ("applied", "unchanged", "invalid")
        }
        read = read or watched_state(spec)
        self._contents = dict(read.contents)
        self._applied = {path: read.signatures.get(path) for path in self.files}  # the options' files
        # At the last check. Now, not as read: a file changed since the options were read and not
        # since this sink was built has settled, so the first check applies it.
        self._seen = self._signatures()

    @property
    def settling(self) -> bool:
        """A change was seen at the last check and is waiting for a second look (after SETTLE s)."""
        return self._seen != self._applied

    def _signatures(self) -> dict[str, Signature]:
        return {path: _signature(path) for path in self.files}

    def _masked(self, exc: BaseException, spec: SinkSpec | None) -> str:
        """``exc``'s type and text without the secrets of the old options or the new (its library's
        error may quote the token it was given)."""
        try:
            text = f"{type(exc).__name__}: {exc}"
        except Exception:  # a plugin's exception whose __str__ raises
            text = type(exc).__name__
        for options in (self.spec.options, None if spec is None else spec.options):
            try:
                forms = option_secrets(options) if options is not None else []
            except Exception:  # an options model of a plugin's own making: nothing found in it
                forms = []
            text = Scrubber(forms)(text)
        return text

    def check(self) -> bool:
        """True when the sink was rebuilt with re-read options. Never raises."""
        now = self._signatures()
        settled = now == self._seen
        self._seen = now
        if now == self._applied or not settled:
            return False
        changed = [path for path in self.files if now[path] != self._applied.get(path)]
        self._applied = now
        name = self.spec.name
        where = ", ".join(f"{path} ({', '.join(self.files[path])})" for path in changed)
        spec = None
        try:
            spec = self.spec.reread()
            sink = spec.sink_cls(spec.options, self.pipeline.sink.context)
        except ConfigError as exc:
            self._m["invalid"].inc()
            log.error(
                "sink %s: %s changed, but its options are invalid now; it goes on with the options it had: %s",
                name,
                where,
                exc,
            )
            return False
        except BaseException as exc:  # a plugin's __init__ may raise anything, no Exception too
            if raised_by_signal(exc) or (isinstance(exc, asyncio.CancelledError) and cancelled_now()):
                raise  # Ctrl-C, a stop: not the plugin's fault
            # Else it ended the reload task, and so the router: all its sinks stopped at a rotation.
            self._m["invalid"].inc()
            log.error(
                "sink %s: %s changed, but the sink cannot be built with it (%s); it goes on with the "
                "options it had",
                name,
                where,
                self._masked(exc, spec),
            )
            return False
        old = self.spec.options
        differ = [
            field for field in type(old).model_fields if getattr(old, field) != getattr(spec.options, field)
        ]
        contents = _contents(spec)
        for path, digest in contents.items():
            if digest != self._contents.get(path):
                differ.extend(o for o in self.files.get(path, ()) if o not in differ)
        self._contents = contents
        if not differ:
            self._m["unchanged"].inc()
            log.info("sink %s: %s changed on disk with the same values; nothing to do", name, where)
            return False
        self.spec = dataclasses.replace(self.spec, options=spec.options)
        self.pipeline.replace_sink(sink)
        self._m["applied"].inc()
        # Option names and paths only: the values may be secrets.
        log.info(
            "sink %s: %s changed (%s); the sink is rebuilt with it before its next send",
            name,
            where,
            ", ".join(differ),
        )
        return True
