from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from eventrouter.config import SinkSpec, spec_for_class
from eventrouter.sink import Sink


def make_spec(sink_cls: type[Sink[Any]], name: str = "mem", **options: Any) -> SinkSpec:
    return spec_for_class(sink_cls, {"name": name, **options}, type_="memory", where=f"test sink {name}")


@pytest.fixture
def spec_factory() -> Any:
    return make_spec


def keys(occs: Sequence[Any]) -> list[tuple[str, int]]:
    return [(o.uid, o.number) for o in occs]
