"""The router process's collector settings (applied by the CLI, undone here after each check)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from eventrouter.gc_tuning import YOUNG_THRESHOLD, tune_gc


@pytest.fixture
def restore_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


@pytest.mark.usefixtures("restore_gc")
def test_startup_objects_are_frozen_and_young_collections_are_rarer() -> None:
    older = gc.get_threshold()[1:]
    tune_gc()
    assert gc.get_freeze_count() > 10_000  # the imports: no longer walked by every collection
    assert gc.get_threshold() == (YOUNG_THRESHOLD, *older)


@pytest.mark.usefixtures("restore_gc")
def test_cycles_created_after_tuning_are_still_collected() -> None:
    import weakref

    tune_gc()

    class Node:
        other: object

    a, b = Node(), Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b
    gc.collect()
    assert gone() is None
