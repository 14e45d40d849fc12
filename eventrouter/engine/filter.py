"""Per-sink filters compiled once into a predicate over the normalised record."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable

from eventrouter.options import FilterOptions
from eventrouter.record import Occurrence

__all__ = ["compile_filter"]

Predicate = Callable[[Occurrence], bool]


def _matcher(patterns: Iterable[str]) -> Callable[[str], bool] | None:
    """Names, or shell-style globs (``kube-*``) when a pattern has wildcards, ignoring case.

    Kinds and reasons are CamelCase (``Pod``, ``BackOff``): ``kinds=pod`` matched nothing, silently,
    while ``types=warning`` is taken as ``Warning``. Two kinds or reasons that differ only in case
    name the same thing, and namespaces are lower case anyway."""
    exact = {p.casefold() for p in patterns if not any(c in p for c in "*?[")}
    globs = [re.compile(fnmatch.translate(p), re.IGNORECASE) for p in patterns if any(c in p for c in "*?[")]
    if not exact and not globs:
        return None

    def match(value: str) -> bool:
        return value.casefold() in exact or any(g.match(value) for g in globs)

    return match


def compile_filter(opts: FilterOptions) -> Predicate | None:
    """None when the options keep everything (the common case costs nothing)."""
    checks: list[Predicate] = []
    types = set(opts.types)
    if opts.level == "Warning":
        types = (types & {"Warning"}) if types else {"Warning"}
    if types:
        checks.append(lambda o: o.record["type"] in types)

    def field(patterns: list[str], get: Callable[[Occurrence], str], keep: bool) -> None:
        m = _matcher(patterns)
        if m is not None:
            checks.append((lambda o: m(get(o))) if keep else (lambda o: not m(get(o))))

    ns: Callable[[Occurrence], str] = lambda o: o.record["namespace"]  # noqa: E731
    kind: Callable[[Occurrence], str] = lambda o: o.record["involved_object"]["kind"]  # noqa: E731
    reason: Callable[[Occurrence], str] = lambda o: o.record["reason"]  # noqa: E731
    field(opts.namespaces, ns, True)
    field(opts.exclude_namespaces, ns, False)
    field(opts.kinds, kind, True)
    field(opts.exclude_kinds, kind, False)
    field(opts.reasons, reason, True)
    field(opts.exclude_reasons, reason, False)
    comp = _matcher(opts.components)
    if comp is not None:
        checks.append(lambda o: comp(o.record["reporting_component"]) or comp(o.record["source_component"]))
    if opts.message is not None:
        keep_re = re.compile(opts.message)
        checks.append(lambda o: keep_re.search(o.record["message"]) is not None)
    if opts.exclude_message is not None:
        drop_re = re.compile(opts.exclude_message)
        checks.append(lambda o: drop_re.search(o.record["message"]) is None)
    if opts.min_count > 1:
        min_count = opts.min_count
        checks.append(lambda o: o.number >= min_count)
    if not checks:
        return None
    if len(checks) == 1:
        return checks[0]
    return lambda o: all(check(o) for check in checks)
