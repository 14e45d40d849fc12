"""Settings for a whole Router against the project's Kubernetes API test server (tests, benches)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from eventrouter.app import RouterSettings
from eventrouter.source.watcher import WatchSettings
from eventrouter.testing.apiserver import FakeApiServer

__all__ = ["router_settings"]


def router_settings(
    api: FakeApiServer, tmp_path: Path, *, watch: dict[str, Any] | None = None, **kw: Any
) -> RouterSettings:
    """A Router on ``api`` with short watch timings (``watch``: more WatchSettings) and ``kw``."""
    return RouterSettings(
        cluster_name=kw.pop("cluster_name", "test"),
        kubeconfig=str(api.kubeconfig(tmp_path / "kubeconfig")),
        metrics_addr=kw.pop("metrics_addr", None),
        shutdown_timeout=kw.pop("shutdown_timeout", 5.0),
        watch=WatchSettings(watch_timeout=30, backoff_initial=0.05, backoff_max=0.5, **(watch or {})),
        **kw,
    )
