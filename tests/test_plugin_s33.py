"""What `SinkPlugin.load` refuses in a sink class and what item 251 made a sink's fault at its calls,
also where a class is given without an entry point (`config.spec_for_class`, used by embedders and
tests) and at its constructor (`SinkSpec.build`) (session 33)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import pytest

from eventrouter.config import ConfigError, SinkSpec, spec_for_class
from eventrouter.options import Secret, SinkOptions
from eventrouter.record import Occurrence
from eventrouter.sink import Outcome, Sink, SinkContext

TOKEN = "t0k3n-of-the-plugin"


class SyncSend(Sink[SinkOptions]):
    def send(self, batch: Sequence[Occurrence]) -> Sequence[Outcome] | None:  # type: ignore[override]
        return None


class AsyncGivenUp(Sink[SinkOptions]):
    async def send(self, batch: Sequence[Occurrence]) -> Sequence[Outcome] | None:
        return None

    async def given_up(self, occurrences: Any) -> None:  # type: ignore[override]
        pass


class NoModel(Sink[SinkOptions]):
    options_model = dict  # type: ignore[assignment]

    async def send(self, batch: Sequence[Occurrence]) -> Sequence[Outcome] | None:
        return None


class NoSink:
    options_model = SinkOptions


@pytest.mark.parametrize(
    ("cls", "fault"),
    [
        (SyncSend, f"({__name__}.SyncSend): send must be async def"),
        (AsyncGivenUp, f"({__name__}.AsyncGivenUp): given_up must be a plain def"),
        (NoModel, "its options_model is <class 'dict'>, not an eventrouter.options.SinkOptions subclass"),
        (NoSink, "not an eventrouter.sink.Sink subclass"),
    ],
)
def test_spec_for_class_refuses_what_loading_a_plugin_refuses(cls: Any, fault: str) -> None:
    """Item 251 refused a plain `def send` (delivered on every retry, for ever) at a plugin's load
    only: a class handed to spec_for_class was taken, or failed later with an AttributeError."""
    with pytest.raises(ConfigError, match=r"^embedded \(sink 'p'\)|^embedded: sink type 'p'") as refused:
        spec_for_class(cls, {"name": "p"}, type_="p", where="embedded")
    assert fault in str(refused.value)


class Boom(BaseException):
    """A library's own BaseException subclass."""


class _Options(SinkOptions):
    token: Secret | None = None


def _raising(exc: BaseException) -> type[Sink[_Options]]:
    class Raising(Sink[_Options]):
        options_model = _Options

        def __init__(self, options: _Options, context: SinkContext) -> None:
            raise exc

        async def send(self, batch: Sequence[Occurrence]) -> Sequence[Outcome] | None:
            return None

    return Raising


def _spec(exc: BaseException) -> SinkSpec:
    return spec_for_class(_raising(exc), {"name": "p", "token": TOKEN}, type_="p", where="--sink #1")


def _context() -> SinkContext:
    return SinkContext(name="p", cluster="", data_dir=None, logger=logging.getLogger("t"), send_timeout=1.0)


@pytest.mark.parametrize(
    ("exc", "said"),
    [
        (SystemExit(0), "SystemExit: 0"),
        (SystemExit(), "SystemExit"),
        (GeneratorExit(), "GeneratorExit"),
        (Boom(f"no region for token {TOKEN}"), "Boom: no region for token ****"),
        (asyncio.CancelledError(), "CancelledError"),  # raised, not a cancellation: nothing cancels here
    ],
)
async def test_a_constructors_base_exception_is_a_configuration_error_naming_the_sink(
    exc: BaseException, said: str
) -> None:
    """Before, SystemExit passed through build (`run` ended with the plugin's code, 0 for sys.exit(),
    naming nothing), and the others were tracebacks."""
    with pytest.raises(ConfigError) as refused:
        _spec(exc).build(_context())
    assert str(refused.value) == f"--sink #1 (sink 'p'): the p sink cannot be built: {said}"


async def test_ctrl_c_and_a_cancellation_of_the_task_still_go_through_build() -> None:
    """Not the plugin's doing: a KeyboardInterrupt while SIGINT is Python's (Ctrl-C), and a
    CancelledError while the running task is being cancelled."""
    with pytest.raises(KeyboardInterrupt):
        _spec(KeyboardInterrupt()).build(_context())

    async def building() -> None:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()  # being cancelled now (a stop), as cancelled_now() tells
        _spec(asyncio.CancelledError()).build(_context())

    with pytest.raises(asyncio.CancelledError):  # a ConfigError had it been taken as the plugin's
        await asyncio.create_task(building())
