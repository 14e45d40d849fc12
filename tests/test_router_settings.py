"""RouterSettings built in code are checked as the command line's options are."""

from __future__ import annotations

import pytest

from eventrouter.app import Router, RouterSettings, check_stall_timeout
from eventrouter.source.watcher import WatchSettings


def test_a_router_built_in_code_refuses_a_stall_timeout_shorter_than_a_quiet_watch() -> None:
    """Only the command line refused it: a Router built in code with ``watch_timeout`` 1800 and the
    default ``stall_timeout`` 600 failed /healthz from 600 s to 1,800 s into every quiet watch (Events
    have no bookmarks by default), and the liveness probe restarted it again and again. Refused at
    construction now, naming both settings and both ways out."""
    for watch_timeout, stall_timeout, least, most in (
        (1800, 600.0, 1840, " or watch.watch_timeout to at most 560"),
        (290, 300.0, 330, " or watch.watch_timeout to at most 260"),
        (290, 30.0, 330, ""),
    ):
        settings = RouterSettings(
            stall_timeout=stall_timeout, watch=WatchSettings(watch_timeout=watch_timeout)
        )
        with pytest.raises(ValueError) as refused:
            Router(settings, [])
        text = str(refused.value)
        assert text.startswith(
            f"RouterSettings: stall_timeout {stall_timeout:g} is too short for watch.watch_timeout {watch_timeout}"
        ), text
        assert f"raise stall_timeout to at least {least} (watch.watch_timeout + 40){most};" in text, text
        assert "allow_short_stall_timeout=True" in text, text
        # Where quiet watches make progress sooner (bookmarks, a test server), the embedder says so.
        settings.allow_short_stall_timeout = True
        Router(settings, [])
    settings = RouterSettings()
    settings.stall_timeout = 100  # changed after it was built: still checked
    with pytest.raises(ValueError, match="stall_timeout 100 is too short"):
        Router(settings, [])
    Router(RouterSettings(), [])  # the defaults: 600 ≥ 290 + 40
    Router(RouterSettings(stall_timeout=1840, watch=WatchSettings(watch_timeout=1800)), [])


def test_the_command_line_and_the_router_share_one_check() -> None:
    """One check, named by the command line's options there and by the settings' fields here."""
    with pytest.raises(ValueError) as cli:
        check_stall_timeout(1800, 600, ("--stall-timeout", "--watch-timeout"))
    with pytest.raises(ValueError) as code:
        check_stall_timeout(1800, 600)
    assert str(cli.value).replace("--stall-timeout", "stall_timeout").replace(
        "--watch-timeout", "watch.watch_timeout"
    ) == str(code.value)
    check_stall_timeout(1800, 1840)
