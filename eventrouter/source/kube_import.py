"""Import only the parts of kubernetes-asyncio the router uses.

``import kubernetes_asyncio.config`` runs the package's ``__init__``, which imports every generated
API class and model: ~850 modules, ~35 MiB resident for the life of the process, while the router
needs the configuration loaders and ``ApiClient``'s raw request path only. The packages whose
``__init__`` pulls all of that in are registered *unexecuted*; any other use of them in the same
process (a plugin, a test, ``from kubernetes_asyncio.client import CoreV1Api``) runs their real
``__init__`` on first access, so full imports keep working.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType
from typing import Any

__all__ = ["load"]

# Parents first: finding a subpackage's spec must not execute its parent.
_HEAVY = ("kubernetes_asyncio", "kubernetes_asyncio.client", "kubernetes_asyncio.client.models")


def _defer(name: str) -> None:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    loader = spec.loader

    def __getattr__(attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        # `from package import submodule` probes the attribute first: import just that submodule.
        if importlib.util.find_spec(f"{name}.{attr}") is not None:
            return importlib.import_module(f"{name}.{attr}")
        # Anything else: this process wants the whole package after all.
        module.__dict__.pop("__getattr__", None)
        loader.exec_module(module)
        return getattr(module, attr)

    module.__getattr__ = __getattr__  # type: ignore[method-assign]
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)


def load() -> tuple[ModuleType, ModuleType]:
    """The kubernetes-asyncio ``client`` and ``config`` packages, as light as the process allows."""
    if "kubernetes_asyncio" not in sys.modules:
        for name in _HEAVY:
            _defer(name)
    from kubernetes_asyncio.client.api_client import ApiClient
    from kubernetes_asyncio.client.configuration import Configuration

    client = sys.modules["kubernetes_asyncio.client"]
    # The config loaders do `from kubernetes_asyncio.client import ApiClient, Configuration`.
    client.__dict__.setdefault("ApiClient", ApiClient)
    client.__dict__.setdefault("Configuration", Configuration)
    config = importlib.import_module("kubernetes_asyncio.config")
    return client, config
