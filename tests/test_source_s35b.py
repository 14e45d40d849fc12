"""The list page's marker and grammar check, and a Basic-auth front's error answers (session 35, item
307; a review of item 300).

Item 300's marker was numbered until one was absent from the page: a page holding the marker's texts
(Event text anyone who may create Events writes) cost a scan of the page per number. Its scrubbing of
an error answer masked a Basic user name everywhere (``User "****" cannot list resource "****"``), not
a password an HTML page wrote escaped (``p&amp;ss``), and not the first characters of a non-ASCII one
cut mid-character by the 300-byte quote."""

from __future__ import annotations

import base64
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import FrameType
from typing import Any

import orjson
import pytest
from source_helpers import names as _names
from source_helpers import said as _said

from eventrouter.app import Router
from eventrouter.config import spec_for_class
from eventrouter.scrub import credentials, scrub
from eventrouter.source import list_page
from eventrouter.testing import MemorySink, event_object
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.routers import router_settings
from eventrouter.testing.waiting import until

# ---- F1: the marker, proven absent by one scan of the page -----------------------------------------


class _Scanned(bytes):
    """A page that counts the scans of it for a text (``find``)."""

    scans = 0

    def find(self, *args: object, **kwargs: object) -> int:
        type(self).scans += 1
        return super().find(*args, **kwargs)  # type: ignore[arg-type]


def _page_with_marker_texts(count: int) -> bytes:
    """A page with an item too deep, then an Event whose annotations are item 300's markers and
    ``count`` numbered ones (``… 100`` … : as prefixes they also stand for ``… 1`` … ``… 99``)."""
    deep = b'{"metadata":{"uid":"deep"},"x":' + b"[" * 1100 + b"]" * 1100 + b"}"
    low = 10 ** (len(str(count - 1)) - 1)
    annotations = {f"a{k}": f"#eventrouter: cut out {k}" for k in range(low, low + count)}
    annotations["a"] = "#eventrouter: cut out"
    event = event_object(namespace="a", name="marks", object_name="marks")
    event["metadata"]["annotations"] = annotations
    return (
        b'{"kind":"EventList","metadata":{"resourceVersion":"1"},"items":['
        + deep
        + b","
        + orjson.dumps(event)
        + b"]}"
    )


def test_a_page_holding_the_markers_texts_is_scanned_once_for_a_marker() -> None:
    """1,101 scans of the page (4.6 s for 8 MiB in the review, an hour for 90,000 such texts); one
    now, and the page is still taken with only the deep item refused."""
    data = _page_with_marker_texts(1000)
    _Scanned.scans = 0
    mark = list_page._marker(_Scanned(data))
    assert _Scanned.scans == 1
    assert mark.startswith(b'"#eventrouter: cut out ') and mark.endswith(b'"') and mark[:-1] not in data
    page = list_page.loads_page(data)
    assert [i["metadata"]["name"] for i in page.doc["items"]] == ["marks"]
    assert page.doc["items"][0]["metadata"]["annotations"]["a1000"] == "#eventrouter: cut out 1000"
    assert [data[r.start : r.start + 25] for r in page.refused] == [b'{"metadata":{"uid":"deep"']


# ---- F4: the grammar check of an item too deep, at C speed where it can -----------------------------


def _lines_run_in_list_page(text: bytes) -> tuple[int | None, int]:
    """``_one_value(text)`` and the lines of list_page.py Python ran for it (one loop turn per token
    ran ~10)."""
    lines = 0

    def trace(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal lines
        if frame.f_code.co_filename != list_page.__file__:
            return None
        if event == "line":
            lines += 1
        return trace

    before = sys.gettrace()
    sys.settrace(trace)
    try:
        depth = list_page._one_value(text)
    finally:
        sys.settrace(before)
    return depth, lines


@pytest.mark.parametrize(
    ("item", "depth", "broken"),
    [
        # 8 M of these in a 16 MiB page: 13.7 s in the review, a loop turn per token; 0.6 s now.
        pytest.param(
            b"[" * 1100 + b"0," * 100_000 + b"0" + b"]" * 1100, 1100, (b"0,", b"0 0,"), id="tiny_tokens"
        ),
        pytest.param(
            b"[" * 1100 + b'{"a":[1,"x"]},' * 20_000 + b"{}" + b"]" * 1100,
            1102,
            (b'"x"]}', b'"x",]}'),
            id="small_objects",
        ),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, 100_000, (b"[]", b"{}{}"), id="a_chain_100000_deep"),
    ],
)
def test_an_item_too_deep_is_proven_one_value_without_a_python_turn_per_token(
    item: bytes, depth: int, broken: tuple[bytes, bytes]
) -> None:
    """The regex passes and orjson check the tokens; Python runs a loop turn per run of brackets (and
    per text between them that is not short), not per token."""
    found, lines = _lines_run_in_list_page(item)
    assert found == depth and lines < 2_000, (found, lines)
    assert list_page._one_value(item[:-1]) is None and list_page._one_value(item + b"0") is None
    assert list_page._one_value(item.replace(*broken, 1)) is None


@pytest.mark.parametrize(
    ("item", "one_value"),
    [
        (b"", False),  # ",,"
        (b"0 0", False),
        (b"01", False),
        (b'"k":0', False),
        (b"-", False),
        (b"NaN", True),  # the grammar's, not orjson's: checked again without it
        (b"1e400", True),
        (b' "s" ', True),
    ],
)
def test_a_long_text_between_brackets_is_checked_whole_a_piece_at_a_time(
    item: bytes, one_value: bool
) -> None:
    """A guard: 200 KB of ``0,`` between two brackets is checked by orjson in pieces cut before a
    comma (parsed whole it held +200 MiB): an item wrong or right at any place, near a cut too."""
    items = [b"0"] * 100_000
    for at in (
        0,
        32_767,
        32_768,
        32_769,
        65_535,
        65_536,
        65_537,
        99_999,
    ):  # pieces end after 32,768 and 65,536
        text = b"[" * 1100 + b",".join([*items[:at], item, *items[at + 1 :]]) + b"]" * 1100
        assert list_page._one_value(text) == (1100 if one_value else None), at


# ---- F2, F3, F5: a Basic-auth front quoting the credentials it refused -----------------------------


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer() as server:  # no tokens: a Basic-auth front in front of it checks
        server.bookmark_interval = 0.2
        yield server


def _router(api: FakeApiServer, tmp_path: Path, user: str, password: str) -> Router:
    settings = router_settings(api, tmp_path)
    api.kubeconfig(settings.kubeconfig or "", basic=(user, password))
    spec = spec_for_class(MemorySink, {"name": "mem", "batch_max_wait": 0.02}, type_="memory")
    return Router(settings, [spec])


def _restarts(router: Router, reason: str) -> float:
    value: float = router.metrics.watch_restarts.labels(reason)._value.get()
    return value


def _never_logged(caplog: pytest.LogCaptureFixture, *texts: str) -> None:
    for record in caplog.records:
        message = record.getMessage()
        assert not any(t in message for t in texts), message


DENIED = (
    'events is forbidden: User "events" cannot list resource "events" in API group "" at the cluster scope'
)


@pytest.mark.parametrize(
    ("echo_basic", "quoted"),
    [
        pytest.param(False, " (refused Authorization: ****)", id="the_header_quoted"),
        pytest.param(True, " (password **** refused for events)", id="the_password_and_user_quoted"),
    ],
)
async def test_a_basic_user_name_is_kept_in_the_apis_denial_and_its_password_masked(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture, echo_basic: bool, quoted: str
) -> None:
    """User "events": the 403 said ``**** is forbidden: User "****" cannot list resource "****"``,
    hiding who was refused. The user name is no secret (kube-apiserver names it in every denial):
    ``user:password``, the password and the header are masked, not it."""
    api.create_event(event_object(object_name="kept"))
    message = DENIED  # a Status as the API server writes it, quoted by the front with what it refused
    api.faults.fail_next(403, verbs=("list",), message=message, echo="Authorization", echo_basic=echo_basic)
    router = _router(api, tmp_path, "events", "s3cr3t-pass")
    caplog.set_level(logging.INFO)
    async with router.running():
        await until(lambda: "kept" in _names(router))
    said = _said(caplog, "403 ")
    assert len(said) == 1 and said[0].endswith(DENIED + quoted), said
    header = base64.b64encode(b"events:s3cr3t-pass").decode()
    _never_logged(caplog, "s3cr3t", header[:12], header[-12:])


@pytest.mark.parametrize(
    "password",
    [
        pytest.param("p&ss<w>rd-1", id="amp_lt_gt"),
        pytest.param('it\'s "p&ss"', id="quotes"),
        pytest.param("<<>>&&", id="entities_only"),
    ],
)
async def test_a_basic_password_an_html_page_writes_escaped_is_masked(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture, password: str
) -> None:
    """A Basic-auth front's page writes the password it refused as HTML text (``p&amp;ss&lt;w&gt;rd``):
    the raw, URL-encoded and JSON-escaped forms were masked, not that one."""
    router = _router(api, tmp_path, "router", password)
    caplog.set_level(logging.INFO)
    async with router.running():
        await until(lambda: api.active_watches == 1)
        api.faults.error_page_next(2000, verbs=("watch",), echo="Authorization", echo_at=12, echo_basic=True)
        api.disconnect_watches()
        await until(lambda: _restarts(router, "http_503") == 1)
        api.create_event(event_object(object_name="after"))
        await until(lambda: "after" in _names(router))
    said = _said(caplog, "503 ")
    assert len(said) == 1 and "<html><body><p>password **** refused for router</p><h1>" in said[0], said
    _never_logged(caplog, password[:4], "&amp;", "&lt;")


@pytest.mark.parametrize(
    ("password", "whole", "cut_into"),
    [
        pytest.param("pässwörtgeheim", "pässw", 1, id="cut_in_a_2_byte_character"),
        pytest.param("geheim€pass", "geheim", 1, id="1_byte_of_a_3_byte_character"),
        pytest.param("geheim€pass", "geheim", 2, id="2_bytes_of_a_3_byte_character"),
    ],
)
async def test_a_non_ascii_password_cut_mid_character_by_the_quote_is_masked_from_its_start(
    api: FakeApiServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    password: str,
    whole: str,
    cut_into: int,
) -> None:
    """A page over 64 KiB is quoted by its first 300 bytes; when they end inside a character of the
    password, it was quoted as U+FFFD and the characters before it (``pässw``) stayed in the log."""
    quote = b"<p>password "
    at = 300 - len(quote) - len(whole.encode()) - cut_into  # byte 300 is inside the next character
    router = _router(api, tmp_path, "router", password)
    caplog.set_level(logging.INFO)
    async with router.running():
        await until(lambda: api.active_watches == 1)
        api.faults.error_page_next(
            100_000, verbs=("watch",), echo="Authorization", echo_at=at, echo_basic=True
        )
        api.disconnect_watches()
        await until(lambda: _restarts(router, "http_503") == 1)
        api.create_event(event_object(object_name="after"))
        await until(lambda: "after" in _names(router))
    said = _said(caplog, "503 ")
    assert len(said) == 1, said
    assert said[0].endswith("<p>password **** (the first 300 bytes of a body over 64 KiB, not read on)"), said
    _never_logged(caplog, whole[:4], "\ufffd")


def test_a_secret_cut_mid_character_at_the_end_of_any_excerpt_is_masked_from_its_start() -> None:
    """The shared scrubber, for the sinks that decode a cut excerpt with "replace" (the webhook's):
    the U+FFFD of a character cut in two hid the secret's first characters from the cut-off check."""
    for password, whole in (("pässwörtgeheim", "pässw"), ("geheim€pass", "geheim")):
        following = password[len(whole)].encode()
        for kept in range(1, len(following)):
            text = (f"refused password {whole}".encode() + following[:kept]).decode("utf-8", "replace")
            assert scrub(text, credentials(sent=[password]), partial=True) == "refused password ****", text
