"""Sink plugin discovery (entry-point group ``eventrouter.sinks``).

Discovery (sorted, de-duplicated, naming the distribution) is separate from loading, so a broken
third-party package only fails when it is used and the error names that package.
"""

from __future__ import annotations

import importlib.metadata
import logging
from dataclasses import dataclass
from typing import Any

from eventrouter.options import COMMON_KEYS, SinkOptions, field_names
from eventrouter.sink import Sink, contract_faults

log = logging.getLogger(__name__)

BUILTIN = "eventrouter"
"""The distribution whose sinks no other package can replace under their names."""

__all__ = [
    "GROUP",
    "RESERVED",
    "PluginError",
    "SinkPlugin",
    "class_faults",
    "discover",
    "load",
    "reserved_faults",
]

GROUP = "eventrouter.sinks"


class PluginError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class SinkPlugin:
    name: str
    value: str
    distribution: str
    version: str

    def load(self) -> type[Sink[Any]]:
        try:
            obj = importlib.metadata.EntryPoint(self.name, self.value, GROUP).load()
        except KeyboardInterrupt:
            raise  # Ctrl-C during a slow import
        except BaseException as exc:
            # Also an SDK's sys.exit("please install …") at import: it ended `eventrouter sinks` for
            # every sink, and `run`/`check` with it configured, without naming the package.
            raise PluginError(
                f"sink {self.name!r} from {self.distribution} {self.version} failed to load "
                f"({self.value}): {type(exc).__name__}: {exc}"
            ) from exc
        if not (isinstance(obj, type) and issubclass(obj, Sink)):
            raise PluginError(
                f"sink {self.name!r} from {self.distribution} points at {self.value}, "
                "which is not an eventrouter.sink.Sink subclass"
            )
        model = getattr(obj, "options_model", None)
        if not (isinstance(model, type) and issubclass(model, SinkOptions)):
            raise PluginError(
                f"sink {self.name!r} from {self.distribution} {self.version}: its options_model is "
                f"{model!r}, not an eventrouter.options.SinkOptions subclass"
            )
        if faults := contract_faults(obj) + reserved_faults(model):
            # A plain `def send` delivered its batch on every try while the engine retried it for ever.
            raise PluginError(
                f"sink {self.name!r} from {self.distribution} {self.version} ({self.value}): "
                + "; ".join(faults)
            )
        return obj


def class_faults(obj: object) -> list[str]:
    """What ``SinkPlugin.load`` refuses in a class, for one given without an entry point
    (``config.spec_for_class``: embedders, tests): no Sink, no SinkOptions model, a method of the
    wrong kind."""
    if not (isinstance(obj, type) and issubclass(obj, Sink)):
        return ["not an eventrouter.sink.Sink subclass"]
    model = getattr(obj, "options_model", None)
    if not (isinstance(model, type) and issubclass(model, SinkOptions)):
        return [f"its options_model is {model!r}, not an eventrouter.options.SinkOptions subclass"]
    return contract_faults(obj) + reserved_faults(model)


RESERVED = COMMON_KEYS | {"type"}
"""Option names a sink may not define: the engine's filter and pipeline keys, and ``type`` (a YAML
entry's sink type; refused in a --sink query), which no one could ever set."""


def reserved_faults(model: type[SinkOptions]) -> list[str]:
    """The reserved names ``model`` defines (``url`` and ``include_raw`` are the base model's own),
    as a fault: one was never set (the engine took the key), or `type` always kept its default."""
    clash = (field_names(model) - {"url", "include_raw"}) & RESERVED
    return [f"defines reserved option names {sorted(clash)}"] if clash else []


def discover() -> dict[str, SinkPlugin]:
    """Installed sinks by name. When two distributions claim a name, eventrouter's own sink wins
    (a package must not take over `loki` and the credentials configured for it), else the first
    distribution by name; the other is named in a warning."""
    found: dict[str, SinkPlugin] = {}
    eps = sorted(
        importlib.metadata.entry_points(group=GROUP),
        key=lambda ep: (
            ep.name,
            (ep.dist.name if ep.dist else "") != BUILTIN,
            ep.dist.name if ep.dist else "",
        ),
    )
    for ep in eps:
        if ep.name in found:
            other = ep.dist.name if ep.dist else "?"
            if other != found[ep.name].distribution:
                log.warning(
                    "sink type %r is registered by %s and by %s: the one from %s is used",
                    ep.name,
                    found[ep.name].distribution,
                    other,
                    found[ep.name].distribution,
                )
            continue
        dist = ep.dist
        found[ep.name] = SinkPlugin(
            name=ep.name,
            value=ep.value,
            distribution=dist.name if dist else "?",
            version=dist.version if dist else "?",
        )
    return found


def load(name: str, plugins: dict[str, SinkPlugin] | None = None) -> type[Sink[Any]]:
    plugins = discover() if plugins is None else plugins
    plugin = plugins.get(name)
    if plugin is None:
        known = ", ".join(sorted(plugins)) or "none"
        raise PluginError(f"unknown sink type {name!r} (installed: {known})")
    return plugin.load()
