"""The router's own log (``setup_logging``), session 34 (item 291): the text format shows terminal
controls, never runs them. Event fields reach it through the reasons it logs (a webhook's 422 quoting
the field it refused): ESC sequences cleared the screen of ``kubectl logs -f``, hid the rest of the
line or set the window title. JSON lines were escaped by their encoder already."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator

import pytest

from eventrouter import OutcomeKind, SinkContext
from eventrouter.logs import setup_logging
from eventrouter.testing import make_occurrence
from eventrouter.testing.receivers.webhook import WebhookReceiver
from eventrouter_sinks.webhook import WebhookOptions, WebhookSink

EVIL = "\x1b]0;pwned\x07\x1b[2J\x1b[8m\x08\x08\x0b\x0c\r\x00\x7f\x85\x9b31m"
SHOWN = "\\x1b]0;pwned\\x07\\x1b[2J\\x1b[8m\\x08\\x08\\x0b\\x0c\\x0d\\x00\\x7f\\x85\\x9b31m"


@pytest.fixture
def router_log(capsys: pytest.CaptureFixture[str]) -> Iterator[Callable[[], str]]:
    """What the router logs to its stderr (``setup_logging``, as ``eventrouter run`` calls it in the
    test); the root logger's handlers and level put back after."""
    root = logging.getLogger()
    saved = (root.level, root.handlers[:])
    try:
        yield lambda: capsys.readouterr().err
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]


def controls(text: str) -> set[str]:
    """The terminal controls in ``text`` (tab and LF are no such)."""
    return {c for c in text if (ord(c) < 0x20 and c not in "\t\n") or 0x7F <= ord(c) < 0xA0}


def test_text_logs_show_terminal_controls_never_run(router_log: Callable[[], str]) -> None:
    setup_logging("info", "text")
    logging.getLogger("eventrouter.test").warning(
        "sink %s rejected %s: %s", "hook", "k1", "bad " + EVIL + "\tend"
    )
    line = router_log()
    assert line.endswith(f" WARNING eventrouter.test: sink hook rejected k1: bad {SHOWN}\tend\n")
    assert controls(line) == set()


async def test_a_webhook_reason_quoting_an_event_field_is_logged_escaped(
    router_log: Callable[[], str],
) -> None:
    """The receiver refuses the Event's reason and quotes it; the engine logs the reject reason."""
    setup_logging("info", "text")
    async with WebhookReceiver() as hook:
        hook.fail_next(1, 422, body=f"field reason invalid: {EVIL}".encode())
        context = SinkContext("hook", "t", None, logging.getLogger("eventrouter.sink.hook"))
        sink = WebhookSink(WebhookOptions.model_validate({"url": hook.url, "mode": "event"}), context)
        await sink.start()
        try:
            outcomes = await sink.send([make_occurrence(reason=EVIL)])
        finally:
            await sink.aclose()
    assert outcomes is not None
    [outcome] = outcomes
    assert outcome.kind is OutcomeKind.REJECT
    logging.getLogger("eventrouter.engine").warning("sink %s rejected %s: %s", "hook", "k1", outcome.reason)
    text = router_log()
    assert "rejected k1: HTTP 422 from " in text
    assert "field reason invalid: \\x1b]0;pwned\\x07\\x1b[2J\\x1b[8m\\x08\\x08" in text
    assert controls(text) == set()


def test_a_traceback_keeps_its_lines(router_log: Callable[[], str]) -> None:
    """LF and tab are left as they are: a traceback (or a message's own lines) stays readable."""
    setup_logging("info", "text")
    try:
        raise ValueError("boom\x1b[2J")
    except ValueError:
        logging.getLogger("eventrouter.test").exception("failed:\n\tdetail")
    text = router_log()
    assert "failed:\n\tdetail\nTraceback (most recent call last):\n" in text
    assert text.rstrip("\n").endswith("ValueError: boom\\x1b[2J")


def test_json_logs_are_unchanged(router_log: Callable[[], str]) -> None:
    """Escaped by the JSON encoder already: the message reads back as it was."""
    setup_logging("info", "json")
    logging.getLogger("eventrouter.test").warning("rejected: %s", EVIL)
    doc = json.loads(router_log())
    assert doc["msg"] == "rejected: " + EVIL
