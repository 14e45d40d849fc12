"""A sink's own worker thread for blocking writes (the stdout and file sinks)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, ParamSpec, TypeVar

__all__ = ["CLOSE_GRACE", "SinkThread", "retrieved"]

_P = ParamSpec("_P")
_T = TypeVar("_T")

CLOSE_GRACE = 1.0
"""Seconds ``aclose`` waits for a write in progress: one on a healthy stream is done well within it;
at a stop the engine has given up on it already (its batch is spooled or counted as dropped)."""


class SinkThread(Executor):
    """One daemon thread running a sink's blocking calls in order.

    Not a ThreadPoolExecutor: Python joins its threads at exit, so a write blocked on a stalled
    reader (a pipe nobody reads, a hung file system) kept the process from exiting after its
    shutdown had finished, until the kubelet's SIGKILL. A daemon thread is left behind with that
    write, whose batch was not acknowledged."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._shut = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> Future[_T]:
        future: Future[_T] = Future()
        with self._lock:
            if self._shut:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._jobs.put((future, functools.partial(fn, *args, **kwargs)))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            if not self._shut:
                self._shut = True
                if cancel_futures:
                    with contextlib.suppress(queue.Empty):
                        while job := self._jobs.get_nowait():
                            job[0].cancel()
                self._jobs.put(None)  # after the jobs queued: the thread ends once they are done
        if wait:
            self._thread.join()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, call = job
            del job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(call())
                except BaseException as exc:  # as ThreadPoolExecutor: the caller gets it
                    future.set_exception(exc)
            del future, call  # an idle thread holds no batch


def retrieved(future: asyncio.Future[Any]) -> None:
    # The outcome is read by a later send; this keeps an abandoned one from being reported as
    # "never retrieved" when the sink is closed before that.
    if not future.cancelled():
        future.exception()
