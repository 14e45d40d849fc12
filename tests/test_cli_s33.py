"""The CLI against third-party sinks that break the contract where item 251 left it (session 33): a
constructor or options model raising a BaseException that is no Exception, a check() or aclose()
that swallows its cancellation or never ends, a send that the stop went on without; and replay's
edges (item 258): `--sink-flags` lines, `--si`/`--sin`. The real CLI in a process of its own; the
plugins are installed as a distribution on a path entry."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from eventrouter.cli import main
from eventrouter.testing.receivers.silent import SilentServer
from eventrouter.testing.waiting import until

DATA = Path(__file__).resolve().parents[1] / "eventrouter" / "testing" / "data"
RECORDING = DATA / "watch-events-v1.jsonl"  # 126 occurrences
TOKEN = "t0k3n-of-the-plugin"

_PLUGINS = '''
import asyncio
import os
import time
from pathlib import Path

from pydantic import field_validator

from eventrouter import Sink, SinkOptions
from eventrouter.options import Secret


class Boom(BaseException):
    """A library's own BaseException subclass."""


class RaisesOptions(SinkOptions):
    what: str = "SystemExit"
    token: Secret | None = None


class Raises(Sink[RaisesOptions]):
    options_model = RaisesOptions

    def __init__(self, options, context):
        token = options.token.get_secret_value() if options.token else ""
        raise {"SystemExit": SystemExit(0), "GeneratorExit": GeneratorExit(), "Boom": Boom(f"token {token}")}[
            options.what
        ]

    async def send(self, batch):
        return None


class ExitingOptions(SinkOptions):
    region: str = ""

    @field_validator("region")
    @classmethod
    def _region(cls, value):
        raise SystemExit(0)  # an SDK's "please install ..." at validation


class ExitsInValidator(Sink[ExitingOptions]):
    options_model = ExitingOptions

    async def send(self, batch):
        return None


async def swallow():
    """Wait for ever, catching every cancellation ("retry until answered")."""
    while True:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            pass


class SwallowingCheck(Sink[SinkOptions]):
    options_model = SinkOptions

    async def check(self):
        await swallow()

    async def send(self, batch):
        return None


class HangingCheck(Sink[SinkOptions]):
    options_model = SinkOptions

    async def check(self):
        await asyncio.Event().wait()  # an endpoint that never answers; cancellable

    async def send(self, batch):
        return None


class ThreadCheck(Sink[SinkOptions]):
    options_model = SinkOptions

    async def check(self):
        Path(os.environ["S33_CHECKING"]).touch()
        await asyncio.to_thread(time.sleep, 3600)  # a synchronous client without a timeout

    async def send(self, batch):
        return None


class ExitingCheck(Sink[SinkOptions]):
    options_model = SinkOptions

    async def check(self):
        raise SystemExit(0)

    async def aclose(self):
        raise SystemExit(3)

    async def send(self, batch):
        return None


class SwallowingClose(Sink[SinkOptions]):
    options_model = SinkOptions

    async def aclose(self):
        await swallow()

    async def send(self, batch):
        return None


class TimeoutOptions(SinkOptions):
    text: str = ""


class TimeoutCheck(Sink[TimeoutOptions]):
    """check() fails at once with its client's own TimeoutError (a connect timeout)."""

    options_model = TimeoutOptions

    async def check(self):
        raise TimeoutError(self.options.text) if self.options.text else TimeoutError()

    async def send(self, batch):
        return None


class TimeoutClose(Sink[SinkOptions]):
    """aclose() fails at once with a TimeoutError of its own (a producer's flush with its bound)."""

    options_model = SinkOptions

    async def aclose(self):
        raise TimeoutError("producer flush timed out after 1s")

    async def send(self, batch):
        return None


class ClosedAfterCheck(Sink[SinkOptions]):
    options_model = SinkOptions

    async def check(self):
        Path(os.environ["S33_CHECKING"]).touch()
        await asyncio.Event().wait()  # an endpoint that never answers; cancellable

    async def aclose(self):
        Path(os.environ["S33_CLOSED"]).touch()

    async def send(self, batch):
        return None


class SwallowingSend(Sink[SinkOptions]):
    options_model = SinkOptions

    async def send(self, batch):
        Path(os.environ["S33_SENDING"]).touch()
        await swallow()
'''

_ENTRY_POINTS = {
    "raises": "Raises",
    "exitsinvalidator": "ExitsInValidator",
    "swallowingcheck": "SwallowingCheck",
    "hangingcheck": "HangingCheck",
    "threadcheck": "ThreadCheck",
    "exitingcheck": "ExitingCheck",
    "swallowingclose": "SwallowingClose",
    "swallowingsend": "SwallowingSend",
    "timeoutcheck": "TimeoutCheck",
    "timeoutclose": "TimeoutClose",
    "closedaftercheck": "ClosedAfterCheck",
}


def _install(tmp_path: Path) -> dict[str, str]:
    """A distribution on a path entry, found by importlib.metadata as an installed one is."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "s33plugins.py").write_text(textwrap.dedent(_PLUGINS))
    info = folder / "s33plugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: s33plugins\nVersion: 0.1\n")
    points = "".join(f"{name} = s33plugins:{cls}\n" for name, cls in _ENTRY_POINTS.items())
    (info / "entry_points.txt").write_text(f"[eventrouter.sinks]\n{points}")
    return {
        "PYTHONPATH": str(folder),
        "S33_SENDING": str(tmp_path / "sending"),
        "S33_CHECKING": str(tmp_path / "checking"),
        "S33_CLOSED": str(tmp_path / "closed"),
    }


def _eventrouter(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # A bound for a hang, not a speed: before, `check` below never ended.
    return subprocess.run(
        [sys.executable, "-m", "eventrouter.cli", *args],
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, **(env or {})},
    )


# ---- 1. a constructor's or options model's BaseException --------------------------------------------


@pytest.mark.parametrize(
    ("flag", "said"),
    [
        ("raises:", "the raises sink cannot be built: SystemExit: 0"),
        ("raises:?what=GeneratorExit", "the raises sink cannot be built: GeneratorExit"),
        (f"raises:?what=Boom&token={TOKEN}", "the raises sink cannot be built: Boom: token ****"),
        ("exitsinvalidator:?region=eu", "option 'region': cannot be validated (SystemExit: 0)"),
    ],
)
@pytest.mark.parametrize("command", ["check --offline", "check", "run --demo --metrics-addr=127.0.0.1:0"])
def test_a_plugin_whose_constructor_or_options_raise_a_base_exception_exits_2_naming_it(
    tmp_path: Path, command: str, flag: str, said: str
) -> None:
    """Before, SystemExit(0) from a plugin's constructor or validator ended `run` and `check` with exit
    0 and nothing said; GeneratorExit or a library's own BaseException was a traceback (exit 1)
    showing the token the plugin's text quoted."""
    result = _eventrouter(*command.split(), f"--sink={flag}", env=_install(tmp_path))
    assert result.returncode == 2, result.stderr
    sink = flag.split(":")[0]
    assert f"--sink #1 (sink {sink!r}): {said}" in result.stderr
    assert "Traceback" not in result.stderr and TOKEN not in result.stderr + result.stdout


# ---- 2. a check() or aclose() that does not end --------------------------------------------------------


@pytest.mark.parametrize(
    ("sink", "said"),
    [
        (
            "swallowingcheck",
            "check() did not finish within send_timeout 1s, and did not stop when cancelled (still running "
            "1s later: it swallows its cancellation)",
        ),
        ("hangingcheck", "check() did not finish within send_timeout 1s"),
        ("threadcheck", "check() did not finish within send_timeout 1s"),
        (
            "swallowingclose",
            "aclose() did not finish within send_timeout 1s, and did not stop when cancelled (still running "
            "1s later: it swallows its cancellation)",
        ),
    ],
)
def test_check_ends_naming_a_plugin_whose_check_or_close_does_not_end(
    tmp_path: Path, sink: str, said: str
) -> None:
    """A check() that swallows its cancellation held `eventrouter check` for ever (asyncio.timeout
    cancelled it, and it went on), and so did any aclose() that never ended (it had no bound) and a
    check() whose thread of asyncio.to_thread never ends (asyncio.run joined it at exit). Now the
    sink is named with the reason, the next sink is still checked, and the command ends with exit 1."""
    result = _eventrouter("check", f"--sink={sink}:?send_timeout=1", "--sink=stdout:", env=_install(tmp_path))
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines() == [f"FAIL  {sink} ({sink}): {said}", "ok    stdout (stdout)"]
    assert "Traceback" not in result.stderr
    if sink.startswith("swallowing"):  # left running: named, where it waits too, and not waited for
        method = "aclose" if sink == "swallowingclose" else "check"
        assert (
            f"exiting (code 1) without waiting for a task, which did not end when cancelled: {method}:{sink} "
            "(waiting in swallow at " in result.stderr
        )
    if sink == "threadcheck":  # its task ended; the thread's call goes on, and held the exit
        assert (
            "exiting (code 1) without waiting for the threads of asyncio.to_thread, which still run a "
            "blocking call (a sink's, whose task was given up)" in result.stderr
        )


def test_a_check_and_close_that_exit_are_still_the_sinks_failure(tmp_path: Path) -> None:
    """Now that check() and aclose() run in a task of their own, where a SystemExit goes out of the
    event loop itself: as before, it is the sink's failure, not the command's exit (0 here)."""
    result = _eventrouter("check", "--sink=exitingcheck:", "--sink=stdout:", env=_install(tmp_path))
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines() == [
        "FAIL  exitingcheck (exitingcheck): SystemExit: 0",
        "ok    stdout (stdout)",
    ]


def test_check_offline_names_a_close_that_does_not_end(tmp_path: Path) -> None:
    result = _eventrouter(
        "check",
        "--offline",
        "--sink=swallowingclose:?send_timeout=1",
        "--sink=stdout:",
        env=_install(tmp_path),
    )
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines()[1:] == ["valid stdout (stdout)"]
    assert result.stdout.startswith("FAIL  swallowingclose (swallowingclose): aclose() did not finish within")


# ---- 3. `run` after a stop that went on without a send ---------------------------------------------


async def test_run_exits_after_its_stop_without_waiting_for_a_send_that_swallows_its_cancellation(
    tmp_path: Path,
) -> None:
    """Item 251 made the stop go on without such a send (its batch spooled), but `asyncio.run` then
    waited for the task for ever: the process exited only at SIGKILL. Now it names the task and where
    it waits, and exits with the router's code once the stop has kept everything."""
    env = _install(tmp_path)
    data = tmp_path / "data"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "eventrouter.cli",
        "run",
        "--demo",
        "--metrics-addr=127.0.0.1:0",
        f"--data-dir={data}",
        "--shutdown-timeout=1",
        "--sink=swallowingsend:?send_timeout=1",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **env},
    )
    try:
        await until(lambda: (tmp_path / "sending").exists(), timeout=60)
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):  # a bound for a hang, not a speed: before, it never exited
            _, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    log = err.decode()
    assert proc.returncode == 0, log
    stopped = log.index("stopped after draining")
    left = log.index(
        "exiting (code 0) without waiting for a task, which did not end when cancelled: pipeline:swallowingsend"
    )
    assert log.index("undelivered occurrences kept in the spool for the next start") < stopped < left, log
    assert "Traceback" not in log


# ---- 4. replay's edges --------------------------------------------------------------------------------


def _summary(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    last = result.stderr.strip().splitlines()[-1]
    summary: dict[str, Any] = json.loads(last)
    return summary


def test_sink_flags_lines_end_at_a_line_feed_only(tmp_path: Path) -> None:
    """`str.splitlines` also broke a flag at NEL, U+2028 or a form feed, which the chart lets through
    (it refuses CR and LF): the pieces were taken as sinks of unknown types, exit 2, nothing sent."""
    first, second = tmp_path / "a\u2028b.jsonl", tmp_path / "c\x85d\x0ce.jsonl"
    flags = tmp_path / "sink-flags"
    flags.write_bytes(
        f"# the pod's --sink args\r\nfile:{first}?name=one\r\nfile:{second}?name=two\n".encode()
    )
    result = _eventrouter("replay", f"--sink-flags={flags}", str(RECORDING))
    assert result.returncode == 0, result.stderr
    assert _summary(result)["sinks"] == {
        name: {"delivered": 126, "filtered": 0, "skipped": 0, "dead_lettered": 0, "dropped": 0}
        for name in ("one", "two")
    }
    assert len(first.read_bytes().splitlines()) == len(second.read_bytes().split(b"\n")) - 1 == 126


def test_replay_takes_si_and_sin_as_run_does(tmp_path: Path) -> None:
    """`run` takes --si and --sin for --sink (argparse's abbreviations); for `replay` they were
    ambiguous beside --sink-flags (exit 2), so a router's args copied into a replay failed."""
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    result = _eventrouter("replay", f"--si=file:{one}?name=one", f"--sin=file:{two}?name=two", str(RECORDING))
    assert result.returncode == 0, result.stderr
    assert list(_summary(result)["sinks"]) == ["one", "two"]
    assert len(one.read_bytes().splitlines()) == len(two.read_bytes().splitlines()) == 126


# ---- 5. item 272: a sink's own TimeoutError, Ctrl-C during `check`, an argument refused -----------------


@pytest.mark.parametrize(
    ("flag", "said"),
    [
        (
            "timeoutcheck:?text=connect to broker-1:9093 timed out after 2s",
            "connect to broker-1:9093 timed out after 2s",
        ),
        ("timeoutcheck:", "check() timed out (a TimeoutError of the sink's own, within send_timeout 30s)"),
    ],
    ids=["with-text", "bare"],
)
def test_a_checks_own_timeout_error_is_its_failure_with_its_text_not_a_send_timeout_overrun(
    tmp_path: Path, flag: str, said: str
) -> None:
    """Item 260 told any TimeoutError out of check() as its own bound's expiry: a client's connect
    timeout, raised at once, was "did not finish within send_timeout 30s", and which broker was lost."""
    result = _eventrouter("check", f"--sink={flag}", "--sink=stdout:", env=_install(tmp_path))
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines() == [
        f"FAIL  timeoutcheck (timeoutcheck): {said}",
        "ok    stdout (stdout)",
    ]


@pytest.mark.parametrize("offline", [[], ["--offline"]])
def test_a_close_that_raises_its_own_timeout_error_does_not_fail_the_check(
    tmp_path: Path, offline: list[str]
) -> None:
    """A close's failure is not the check's answer; item 260 made a TimeoutError of its own "aclose()
    did not finish within send_timeout 30s": a valid configuration exited 1 (CI gates on it)."""
    result = _eventrouter("check", *offline, "--sink=timeoutclose:", env=_install(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [f"{'valid' if offline else 'ok   '} timeoutclose (timeoutclose)"]


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


async def _interrupted(
    *args: str, env: dict[str, str], presses: Sequence[Callable[[list[str]], bool]]
) -> tuple[int, str]:
    """Run the CLI, send SIGINT as each of ``presses`` (given the stderr lines so far) comes true,
    and return its exit code and stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "eventrouter.cli",
        *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **env},
        # Ctrl-C as a terminal gives it: a suite started in the background by a shell without job
        # control inherits SIGINT ignored, and the CLI (rightly) keeps an ignored SIGINT ignored.
        preexec_fn=_sigint_default,
    )
    assert proc.stderr is not None
    lines: list[str] = []

    async def read() -> None:
        assert proc.stderr is not None
        while line := await proc.stderr.readline():
            lines.append(line.decode())

    reading = asyncio.create_task(read())
    try:
        for ready in presses:
            await until(lambda: ready(lines), timeout=60)  # noqa: B023 - awaited here, in its turn
            proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(60):  # a bound for a hang, not a speed
            await reading
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        reading.cancel()
    assert proc.returncode is not None
    return proc.returncode, "".join(lines)


async def test_ctrl_c_during_check_still_closes_the_sink(tmp_path: Path) -> None:
    """Item 260 dropped `check`'s try/finally: at a Ctrl-C the sink being checked was never closed."""
    env = _install(tmp_path)
    code, err = await _interrupted(
        "check",
        "--sink=closedaftercheck:?send_timeout=60",
        env=env,
        presses=[lambda _: (tmp_path / "checking").exists()],
    )
    assert code == 130, err
    assert (tmp_path / "closed").exists(), err
    assert "Traceback" not in err


async def test_ctrl_c_during_a_webhook_check_leaves_no_client_session_open(tmp_path: Path) -> None:
    """The symptom of the above with a built-in sink: "ERROR asyncio: Unclosed client session" at exit."""
    async with SilentServer() as silent:
        code, err = await _interrupted(
            "check",
            f"--sink=webhook:{silent.url}/hook?send_timeout=60",
            env={},
            presses=[lambda _: bool(silent.requests)],
        )
    assert code == 130, err
    assert "Unclosed" not in err and "Traceback" not in err


async def test_a_second_ctrl_c_while_the_exit_waits_for_a_thread_ends_the_process_at_once(
    tmp_path: Path,
) -> None:
    """After a first Ctrl-C, the exit gives a thread of asyncio.to_thread (a sink's blocking call) 5 s.
    A second Ctrl-C in them raised KeyboardInterrupt out of that wait, and the interpreter's exit then
    joined the thread: the process hung (here for an hour) and printed two tracebacks. Now the wait
    says so, and a Ctrl-C during it exits 130 with one line naming what it leaves."""
    waiting = "which still run a blocking call (a sink's, whose task was given up); Ctrl-C exits now"
    code, err = await _interrupted(
        "check",
        "--sink=threadcheck:?send_timeout=60",
        env=_install(tmp_path),
        presses=[
            lambda _: (tmp_path / "checking").exists(),  # in the thread
            lambda lines: any(waiting in line for line in lines),  # the exit waits for it
        ],
    )
    assert code == 130, err
    said = (
        "ERROR   eventrouter: exiting (code 130) without waiting for the threads of asyncio.to_thread, which "
        "still run a blocking call (a sink's): Ctrl-C ended the wait"
    )
    assert err.count("exiting (code 130)") == 1 and said in err, err
    assert "Traceback" not in err and "Exception ignored" not in err


@pytest.mark.parametrize(
    "arg",
    [
        "--sinks=loki:http://loki:3100?password={}",
        " --sink=loki:http://u:{}@loki:3100",
        "--sink\u00a0webhook:https://h/k?header=Authorization:Bearer {}",
        "--sink-stdout:?token={}",
        "--s=loki:http://loki:3100?password={}",
    ],
    ids=["typo", "space-before", "non-breaking-space", "dash", "ambiguous"],
)
def test_an_argument_the_router_refuses_is_quoted_without_its_credentials(
    arg: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """argparse's `unrecognized arguments: …` (or `ambiguous option: …`) quoted the argument whole:
    a sink's flag with a typo, or an extraArgs item the chart let through, put its password in the log."""
    with pytest.raises(SystemExit) as exited:
        main(["run", arg.format(TOKEN)])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "eventrouter" in err and TOKEN not in err
    assert "=***" in err or "***@" in err, err
