"""The storage behind FakeApiServer: one global resourceVersion (like the etcd revision), a bounded
change history for Events (the watch cache), list snapshots at a past revision, per-watcher queues.

Every write is O(1) amortised plus one serialisation; each change is serialised once and the same
bytes go to every watcher whose filter matches, so nothing rescans the history per event."""

from __future__ import annotations

import asyncio
import bisect
import re
import secrets
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import orjson

from eventrouter.testing.apiserver_select import FieldSelector, LabelSelector
from eventrouter.testing.apiserver_status import ApiError, already_exists, invalid, not_found

__all__ = ["Change", "EventStore", "ObjectStore", "Revision", "Snapshot", "Stored", "Watcher"]

ADDED, MODIFIED, DELETED = "ADDED", "MODIFIED", "DELETED"

# metav1.ObjectMeta field order, so objects serialise the way the Go encoder writes them.
_META_ORDER = (
    "name",
    "generateName",
    "namespace",
    "selfLink",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "managedFields",
)
_NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"  # what the real generateName suffix draws from
_DNS1123 = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"


def now_time() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Revision:
    """The one monotonically increasing resourceVersion shared by every resource."""

    def __init__(self) -> None:
        self.value = 1

    def next(self) -> int:
        self.value += 1
        return self.value


def _ordered(obj: Mapping[str, Any], kind: str, api_version: str, rv: int) -> dict[str, Any]:
    meta_in = obj.get("metadata") or {}
    meta: dict[str, Any] = {k: meta_in[k] for k in _META_ORDER if k in meta_in}
    meta.update({k: v for k, v in meta_in.items() if k not in meta})
    meta["resourceVersion"] = str(rv)
    out: dict[str, Any] = {"kind": kind, "apiVersion": api_version, "metadata": meta}
    out.update({k: v for k, v in obj.items() if k not in out})
    return out


class Stored:
    """One version of an object: the dict (never mutated once stored) and its serialisations."""

    __slots__ = ("_fields", "_item", "key", "labels", "name", "namespace", "obj", "raw", "rv")

    def __init__(self, obj: dict[str, Any], rv: int) -> None:
        meta = obj["metadata"]
        self.obj = obj
        self.rv = rv
        self.namespace: str = meta.get("namespace") or ""
        self.name: str = meta["name"]
        # etcd key order: "<namespace>/<name>" sorts exactly like /registry/events/<ns>/<name>.
        self.key = f"{self.namespace}/{self.name}"
        self.labels: dict[str, str] = meta.get("labels") or {}
        self.raw = orjson.dumps(obj)
        self._item: bytes | None = None
        self._fields: dict[str, str] | None = None

    @property
    def item(self) -> bytes:
        """The object as a list item: real lists omit kind and apiVersion on items."""
        if self._item is None:
            self._item = orjson.dumps({k: v for k, v in self.obj.items() if k not in ("kind", "apiVersion")})
        return self._item

    def fields(self, extract: Callable[[Mapping[str, Any]], dict[str, str]]) -> dict[str, str]:
        if self._fields is None:
            self._fields = extract(self.obj)
        return self._fields

    def copy(self) -> dict[str, Any]:
        result: dict[str, Any] = orjson.loads(self.raw)
        return result


def watch_line(kind: str, raw: bytes) -> bytes:
    return b'{"type":"' + kind.encode() + b'","object":' + raw + b"}\n"


class Change:
    """One write in the history. For DELETED, ``new`` is the last content with the deletion's RV."""

    __slots__ = ("_line", "kind", "new", "prev", "rv")

    def __init__(self, kind: str, new: Stored, prev: Stored | None) -> None:
        self.kind = kind
        self.new = new
        self.prev = prev
        self.rv = new.rv
        self._line: bytes | None = None

    @property
    def line(self) -> bytes:
        if self._line is None:
            self._line = watch_line(self.kind, self.new.raw)
        return self._line

    def line_as(self, kind: str) -> bytes:
        if kind == self.kind:
            return self.line
        if kind == DELETED and self.prev is not None:
            # The cacher's "object left the selector": previous content, this change's RV.
            prev = self.prev.obj
            obj = dict(prev)
            obj["metadata"] = {**prev["metadata"], "resourceVersion": str(self.rv)}
            return watch_line(DELETED, orjson.dumps(obj))
        return watch_line(kind, self.new.raw)


class Snapshot:
    """The sorted content of a store at one resourceVersion (immutable)."""

    __slots__ = ("keys", "objs", "rv")

    def __init__(self, rv: int, objs: list[Stored]) -> None:
        self.rv = rv
        self.objs = objs
        self.keys = [s.key for s in objs]

    def range(self, namespace: str | None, start: str) -> tuple[int, int]:
        lo, hi = 0, len(self.keys)
        if namespace is not None:
            # "/" + 1 == "0": every key of the namespace sorts between "ns/" and "ns0".
            lo = bisect.bisect_left(self.keys, namespace + "/")
            hi = bisect.bisect_left(self.keys, namespace + "0")
        if start:
            lo = max(lo, bisect.bisect_left(self.keys, start))
        return lo, hi


class Watcher:
    """One watch stream: filter plus a bounded queue of ready-to-send lines."""

    def __init__(
        self,
        *,
        namespace: str | None,
        fields: FieldSelector,
        labels: LabelSelector,
        extract: Callable[[Mapping[str, Any]], dict[str, str]],
        limit: int,
        start_rv: int,
    ) -> None:
        self.namespace = namespace
        self.field_selector = fields
        self.label_selector = labels
        self.extract = extract
        self.limit = limit
        self.start_rv = start_rv
        self.simple = namespace is None and fields.empty and labels.empty
        self.queue: deque[bytes] = deque()
        self.wake = asyncio.Event()
        self.terminated: str | None = None
        self.reset = False  # terminated by a connection reset, not the end of the stream

    def matches(self, s: Stored) -> bool:
        if self.namespace is not None and s.namespace != self.namespace:
            return False
        if not self.field_selector.empty and not self.field_selector.matches(s.fields(self.extract)):
            return False
        return self.label_selector.empty or self.label_selector.matches(s.labels)

    def push(self, line: bytes) -> None:
        if self.terminated:
            return
        self.queue.append(line)
        if len(self.queue) > self.limit:
            # The real cacher closes a watcher whose client does not keep up; the client relists.
            self.terminate("watcher buffer overflow")
            return
        self.wake.set()

    def offer(self, ch: Change) -> None:
        if ch.rv <= self.start_rv:
            # A watch opened ahead of the store (etcd restored from a snapshot) gets nothing up to its
            # resourceVersion: etcd sends ModRevision >= rv + 1, the cacher only rv > the watch's.
            return
        if self.simple:
            self.push(ch.line)
            return
        new_ok = ch.kind != DELETED and self.matches(ch.new)
        old_ok = ch.prev is not None and self.matches(ch.prev)
        if new_ok:
            self.push(ch.line_as(MODIFIED if old_ok else ADDED))
        elif old_ok:
            self.push(ch.line_as(DELETED))

    def terminate(self, why: str, *, reset: bool = False) -> None:
        if not self.terminated:
            self.terminated = why
            self.reset = reset
            self.queue.clear()
        self.wake.set()


class ObjectStore:
    """Objects without a watch cache (ConfigMaps, Leases): get/create/replace/delete/list."""

    def __init__(self, revision: Revision, *, kind: str, resource: str, group: str = "") -> None:
        self.revision = revision
        self.kind = kind
        self.resource = resource
        self.group = group
        self.api_version = f"{group}/v1" if group else "v1"
        self.objects: dict[str, Stored] = {}

    def _key(self, namespace: str, name: str) -> str:
        return f"{namespace}/{name}"

    def get(self, namespace: str, name: str) -> Stored:
        s = self.objects.get(self._key(namespace, name))
        if s is None:
            raise not_found(self.resource, name, self.group)
        return s

    def _prepare(self, obj: Mapping[str, Any], namespace: str | None = None) -> dict[str, Any]:
        meta = dict(obj.get("metadata") or {})
        if namespace is not None:
            meta["namespace"] = namespace
        if not meta.get("namespace"):
            raise ApiError(400, "an empty namespace may not be set during creation")
        if not meta.get("name"):
            if meta.get("generateName"):
                meta["name"] = meta["generateName"] + "".join(secrets.choice(_NAME_CHARS) for _ in range(5))
            else:
                raise invalid(
                    self.kind,
                    "",
                    self.group,
                    "metadata.name",
                    "FieldValueRequired",
                    "Required value: name or generateName is required",
                )
        name = meta["name"]
        if len(name) > 253 or not re.fullmatch(_DNS1123, name):
            raise invalid(
                self.kind,
                name,
                self.group,
                "metadata.name",
                "FieldValueInvalid",
                f'Invalid value: "{name}": a lowercase RFC 1123 subdomain must consist of lower case '
                "alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
            )
        if not meta.get("uid"):
            meta["uid"] = str(uuid.uuid4())
        if not meta.get("creationTimestamp"):
            meta["creationTimestamp"] = now_time()
        out = dict(obj)
        out["metadata"] = meta
        return out

    def validate(self, obj: Mapping[str, Any]) -> None:
        """Resource-specific validation (ConfigMap size); overridden by configuration."""

    def create(self, obj: Mapping[str, Any]) -> Stored:
        prepared = self._prepare(obj)
        self.validate(prepared)
        key = self._key(prepared["metadata"]["namespace"], prepared["metadata"]["name"])
        if key in self.objects:
            raise already_exists(self.resource, prepared["metadata"]["name"], self.group)
        rv = self.revision.next()
        s = Stored(_ordered(prepared, self.kind, self.api_version, rv), rv)
        self.objects[key] = s
        return s

    def replace(self, namespace: str, name: str, obj: Mapping[str, Any]) -> Stored:
        old = self.get(namespace, name)
        meta = dict(obj.get("metadata") or {})
        meta["name"], meta["namespace"] = name, namespace
        meta.setdefault("uid", old.obj["metadata"].get("uid"))
        meta.setdefault("creationTimestamp", old.obj["metadata"].get("creationTimestamp"))
        new = dict(obj)
        new["metadata"] = meta
        self.validate(new)
        if _ordered(new, self.kind, self.api_version, old.rv) == old.obj:
            # etcd3's GuaranteedUpdate writes nothing when the bytes are the same: no new revision.
            return old
        rv = self.revision.next()
        s = Stored(_ordered(new, self.kind, self.api_version, rv), rv)
        self.objects[old.key] = s
        return s

    def delete(self, namespace: str, name: str) -> Stored:
        old = self.get(namespace, name)
        del self.objects[old.key]
        self.revision.next()
        return old

    def list(self, namespace: str | None) -> list[Stored]:
        items = sorted(self.objects.values(), key=lambda s: s.key)
        return [s for s in items if namespace is None or s.namespace == namespace]


class EventStore(ObjectStore):
    """Events with a watch cache: bounded history, snapshots, watchers and TTL expiry."""

    def __init__(
        self,
        revision: Revision,
        *,
        history_size: int | None,
        watcher_buffer: int,
        extract: Callable[[Mapping[str, Any]], dict[str, str]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(revision, kind="Event", resource="events")
        self.history_size = history_size
        self.watcher_buffer = watcher_buffer
        self.extract = extract
        self.clock = clock
        self._hist: list[Change] = []
        self._hist_start = 0
        # Watching from N is possible iff N >= oldest_valid: every change after N is still retained.
        self.oldest_valid = revision.value
        self.watchers: set[Watcher] = set()
        self._sorted: list[str] | None = None
        self._snapshots: OrderedDict[int, Snapshot] = OrderedDict()
        self._touched: OrderedDict[str, float] = OrderedDict()  # key -> last write, oldest first
        self.on_change: Callable[[], None] = lambda: None

    # --- writes --------------------------------------------------------------------------------

    def _record(self, ch: Change) -> None:
        self._hist.append(ch)
        if self.history_size is not None and len(self._hist) - self._hist_start > self.history_size:
            self.oldest_valid = self._hist[self._hist_start].rv
            self._hist_start += 1
            self._shrink()
        for w in self.watchers:
            w.offer(ch)
        self.on_change()

    def create(self, obj: Mapping[str, Any]) -> Stored:
        prepared = self._prepare(obj)
        key = f"{prepared['metadata']['namespace']}/{prepared['metadata']['name']}"
        if key in self.objects:
            raise already_exists(self.resource, prepared["metadata"]["name"])
        rv = self.revision.next()
        s = Stored(_ordered(prepared, self.kind, self.api_version, rv), rv)
        self.objects[key] = s
        self._sorted = None
        self._touched[key] = self.clock()
        self._record(Change(ADDED, s, None))
        return s

    def replace(self, namespace: str, name: str, obj: Mapping[str, Any]) -> Stored:
        old = self.get(namespace, name)
        meta = dict(obj.get("metadata") or {})
        meta["name"], meta["namespace"] = name, namespace
        if not meta.get("uid"):
            meta["uid"] = old.obj["metadata"].get("uid")
        if not meta.get("creationTimestamp"):
            meta["creationTimestamp"] = old.obj["metadata"].get("creationTimestamp")
        new = dict(obj)
        new["metadata"] = meta
        rv = self.revision.next()
        s = Stored(_ordered(new, self.kind, self.api_version, rv), rv)
        self.objects[old.key] = s
        self._touched[old.key] = self.clock()
        self._touched.move_to_end(old.key)
        self._record(Change(MODIFIED, s, old))
        return s

    def delete(self, namespace: str, name: str) -> Stored:
        old = self.get(namespace, name)
        del self.objects[old.key]
        self._touched.pop(old.key, None)
        self._sorted = None
        rv = self.revision.next()
        gone = Stored(_ordered(old.obj, self.kind, self.api_version, rv), rv)
        self._record(Change(DELETED, gone, old))
        return gone

    def expire(self, ttl: float, now: float | None = None) -> list[Stored]:
        """Delete every event not written for ``ttl`` seconds (etcd lease expiry)."""
        cutoff = (self.clock() if now is None else now) - ttl
        gone: list[Stored] = []
        while self._touched:
            key, at = next(iter(self._touched.items()))
            if at > cutoff:
                break
            ns, _, name = key.partition("/")
            gone.append(self.delete(ns, name))
        return gone

    def _shrink(self) -> None:
        if self._hist_start > 1024 and self._hist_start * 2 > len(self._hist):
            del self._hist[: self._hist_start]
            self._hist_start = 0

    def compact(self, rv: int | None = None) -> None:
        """Forget the history up to ``rv`` (default: now), as etcd's compaction does: a watch or a
        list at an older resourceVersion answers 410 Expired."""
        target = self.revision.value if rv is None else min(rv, self.revision.value)
        if target <= self.oldest_valid:
            return
        self.oldest_valid = target
        self._hist_start = bisect.bisect_right(self._hist, target, lo=self._hist_start, key=lambda c: c.rv)
        self._shrink()
        for at in [at for at in self._snapshots if at < target]:
            del self._snapshots[at]

    # --- reads ---------------------------------------------------------------------------------

    def changes_since(self, rv: int) -> list[Change]:
        i = bisect.bisect_right(self._hist, rv, lo=self._hist_start, key=lambda c: c.rv)
        return self._hist[i:]

    def snapshot(self, rv: int | None = None) -> Snapshot:
        """The sorted state at ``rv`` (default: now). The caller checks ``rv >= oldest_valid``."""
        current = self.revision.value
        at = current if rv is None or rv >= current else rv
        cached = self._snapshots.get(at)
        if cached is not None:
            self._snapshots.move_to_end(at)
            return cached
        if self._sorted is None:
            self._sorted = sorted(self.objects)
        if at == current:
            snap = Snapshot(at, [self.objects[k] for k in self._sorted])
        else:
            state = dict(self.objects)
            for ch in reversed(self.changes_since(at)):
                if ch.kind == ADDED:
                    state.pop(ch.new.key, None)
                elif ch.prev is not None:
                    state[ch.prev.key] = ch.prev
            snap = Snapshot(at, [state[k] for k in sorted(state)])
        self._snapshots[at] = snap
        while len(self._snapshots) > 8:
            self._snapshots.popitem(last=False)
        return snap

    def watch(
        self,
        *,
        namespace: str | None,
        fields: FieldSelector,
        labels: LabelSelector,
        since: int | None,
        initial: Iterable[bytes] = (),
    ) -> Watcher:
        """Register a watcher. ``since=None``: synthetic ADDED for the current state first;
        otherwise every retained change after ``since`` (the caller checked it is retained)."""
        w = Watcher(
            namespace=namespace,
            fields=fields,
            labels=labels,
            extract=self.extract,
            limit=self.watcher_buffer,
            start_rv=self.revision.value if since is None else since,
        )
        if since is None:
            for s in self.snapshot().objs:
                if w.matches(s):
                    w.queue.append(watch_line(ADDED, s.raw))
        else:
            for ch in self.changes_since(since):
                w.offer(ch)
        w.queue.extend(initial)
        self.watchers.add(w)
        self.on_change()
        return w

    def unwatch(self, w: Watcher) -> None:
        self.watchers.discard(w)
        self.on_change()
