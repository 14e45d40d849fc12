"""Expand the recorded 1.24 watch stream into a large, varied, deterministic JSON-lines recording.

    python -m bench.corpus [--occurrences 100000] [--seed 7] [--base 2026-11-21T00:00:00Z]

Every line is a watch event ``{"type": ..., "object": ...}`` as the API server sends it. Variety comes
from the recorded objects (core-recorder and eventTime-only events, managedFields, real reasons and
messages) re-issued under many namespaces and object names, plus:

* count raises (MODIFIED with count+1, or series.count+1 for eventTime-only events), some jumps;
* MODIFIED lines that do not raise the number (noise the tracker must ignore) and DELETED lines (TTL);
* long messages (4–32 KiB) and CJK messages.

The same (seed, occurrences, base) gives a byte-identical file. The default base is the start of
yesterday (UTC), so event times are always within the last 7 days (Loki and SLS refuse older samples);
the file is cached under bench/.cache/ and never committed.
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from eventrouter.testing import recorded_watch

__all__ = ["CACHE", "corpus_path", "ensure_corpus", "generate", "read_lines"]

CACHE = Path(__file__).resolve().parent / ".cache"
SPAN_SECONDS = 6 * 3600  # event times spread over six hours after the base

_CJK = [
    "容器启动失败，正在重试",
    "拉取镜像失败：仓库返回 403 禁止访问",
    "节点磁盘压力过高，开始驱逐 Pod",
    "健康检查失败：HTTP 探针返回状态码 503",
    "ボリュームのマウントに失敗しました",
    "스케줄링 실패: 사용 가능한 노드가 없습니다",
]
_TEAMS = ["shop", "payments", "search", "ml", "data", "web", "api", "auth", "billing", "infra"]
_ENVS = ["prod", "staging", "dev", "qa"]
_SYSTEM = ["kube-system", "monitoring", "ingress-nginx", "cert-manager", "logging", "default"]


def default_base() -> datetime:
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return today - timedelta(days=1)


def corpus_path(occurrences: int, seed: int, base: datetime) -> Path:
    return CACHE / f"watch-{occurrences}-s{seed}-{base:%Y%m%dT%H%M%S}.jsonl"


def _namespaces(rng: random.Random) -> list[str]:
    names = [f"{t}-{e}" for t in _TEAMS for e in _ENVS]
    names += [f"tenant-{i:03d}" for i in range(150)]
    names += _SYSTEM
    rng.shuffle(names)
    return names


def _fmt(ts: datetime, micro: bool) -> str:
    if micro:
        return ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return ts.strftime("%Y-%m-%dT%H:%M:%SZ")


class _Gen:
    def __init__(self, seed: int, base: datetime, occurrences: int) -> None:
        self.rng = random.Random(seed)
        self.base = base
        self.target = occurrences
        rec = recorded_watch()
        self.templates = [e["object"] for e in rec if e["type"] == "ADDED"]
        self.namespaces = _namespaces(self.rng)
        # Zipf-ish weights: a few busy namespaces, a long tail.
        self.ns_weights = [1.0 / (i + 1) ** 0.8 for i in range(len(self.namespaces))]
        self.rv = 1000
        self.live: list[dict[str, Any]] = []  # events that may repeat
        self.produced = 0
        self.lines = 0

    def _uuid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def _when(self) -> datetime:
        # Monotonic with small jitter: keeps Loki streams in order within its one-hour window.
        frac = self.produced / self.target
        jitter = self.rng.uniform(0, 2.0)
        return self.base + timedelta(seconds=frac * SPAN_SECONDS + jitter)

    def _message(self, template: dict[str, Any], obj_name: str) -> str:
        roll = self.rng.random()
        msg = str(template.get("message") or "")
        if roll < 0.01:
            # A long message: a stack trace or a big scheduler explanation (4–32 KiB).
            size = self.rng.randint(4096, 32768)
            unit = f"{msg} (object {obj_name}) | "
            return (unit * (size // max(1, len(unit)) + 1))[:size]
        if roll < 0.05:
            return f"{self.rng.choice(_CJK)}：{obj_name}"
        return msg.replace(str(template["involvedObject"].get("name") or "\0"), obj_name)

    def new_event(self) -> dict[str, Any]:
        t = self.rng.choice(self.templates)
        obj: dict[str, Any] = copy.deepcopy(t)
        ns = self.rng.choices(self.namespaces, self.ns_weights)[0]
        kind = obj["involvedObject"].get("kind") or "Pod"
        stem = f"{self.rng.choice(_TEAMS)}-{self.rng.randrange(400):03d}"
        if kind == "Pod":
            obj_name = f"{stem}-{self.rng.getrandbits(40):010x}"[:40]
        elif kind == "Node":
            obj_name = f"node-{self.rng.randrange(300):03d}"
            ns = "default"
        else:
            obj_name = stem
        when = self._when()
        meta = obj["metadata"]
        name = f"{obj_name}.{self.rng.getrandbits(64):016x}"
        meta.update(name=name, namespace=ns, uid=self._uuid(), creationTimestamp=_fmt(when, False))
        for mf in meta.get("managedFields") or []:
            mf["time"] = _fmt(when, False)
        inv = obj["involvedObject"]
        inv.update(name=obj_name, uid=self._uuid())
        if kind != "Node":
            inv["namespace"] = ns
        obj["message"] = self._message(t, obj_name)
        if obj.get("eventTime"):
            obj["eventTime"] = _fmt(when, True)
            obj["firstTimestamp"] = obj["lastTimestamp"] = None
            obj.pop("count", None)
            obj.pop("series", None)
        else:
            obj["firstTimestamp"] = obj["lastTimestamp"] = _fmt(when, False)
            obj["count"] = 1
        return obj

    def raise_count(self, obj: dict[str, Any]) -> None:
        when = self._when()
        step = 1 if self.rng.random() < 0.95 else self.rng.randint(2, 5)  # sometimes the count jumps
        if obj.get("eventTime"):
            series = obj.get("series") or {"count": 1}
            obj["series"] = {"count": int(series["count"]) + step, "lastObservedTime": _fmt(when, True)}
        else:
            obj["count"] = int(obj.get("count") or 1) + step
            obj["lastTimestamp"] = _fmt(when, False)

    def _line(self, kind: str, obj: dict[str, Any]) -> bytes:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.lines += 1
        return orjson.dumps({"type": kind, "object": obj})

    def lines_iter(self) -> Iterator[bytes]:
        rng = self.rng
        while self.produced < self.target:
            roll = rng.random()
            if self.live and roll < 0.35:
                # A repeat of a live event (BackOff, Unhealthy, FailedMount loops).
                i = rng.randrange(len(self.live))
                obj = self.live[i]
                self.raise_count(obj)
                self.produced += 1
                yield self._line("MODIFIED", obj)
            elif self.live and roll < 0.37:
                # A MODIFIED that does not raise the number (annotations, managedFields): no occurrence.
                obj = self.live[rng.randrange(len(self.live))]
                obj["metadata"].setdefault("annotations", {})["bench/touched"] = str(self.lines)
                yield self._line("MODIFIED", obj)
            elif self.live and roll < 0.40:
                # TTL expiry: DELETED, not an occurrence.
                i = rng.randrange(len(self.live))
                obj = self.live[i]
                self.live[i] = self.live[-1]
                self.live.pop()
                yield self._line("DELETED", obj)
            else:
                obj = self.new_event()
                self.produced += 1
                self.live.append(obj)
                if len(self.live) > 5000:
                    self.live.pop(rng.randrange(len(self.live)))
                yield self._line("ADDED", obj)


def generate(path: Path, occurrences: int, seed: int, base: datetime) -> tuple[int, int]:
    """Write the recording; returns (lines, occurrences)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    gen = _Gen(seed, base, occurrences)
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        for line in gen.lines_iter():
            f.write(line + b"\n")
    tmp.replace(path)
    return gen.lines, gen.produced


def ensure_corpus(occurrences: int = 100_000, seed: int = 7, base: datetime | None = None) -> Path:
    """The cached corpus, generated on first use."""
    base = base or default_base()
    path = corpus_path(occurrences, seed, base)
    if not path.exists():
        lines, occ = generate(path, occurrences, seed, base)
        print(f"corpus: wrote {path} ({lines} lines, {occ} occurrences)", file=sys.stderr)
    return path


def read_lines(path: Path) -> list[bytes]:
    return [line for line in path.read_bytes().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.corpus", description=__doc__.split("\n")[0])
    p.add_argument("--occurrences", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--base", help="RFC 3339 start of event times (default: start of yesterday, UTC)")
    p.add_argument("--force", action="store_true", help="regenerate even if cached")
    args = p.parse_args(argv)
    base = datetime.fromisoformat(args.base.replace("Z", "+00:00")) if args.base else default_base()
    path = corpus_path(args.occurrences, args.seed, base)
    if args.force or not path.exists():
        lines, occ = generate(path, args.occurrences, args.seed, base)
    else:
        data = read_lines(path)
        lines, occ = len(data), args.occurrences
    size = path.stat().st_size
    print(f"{path}\n{lines} lines, {occ} occurrences, {size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
