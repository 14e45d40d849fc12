"""What `eventrouter replay` reads from a dead-letter file cut or broken in places: a first letter
torn right after a ``,`` (a kill during the first append to a new or rotated file), a letter with
invalid UTF-8, and the ledger of what an earlier replay delivered."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from eventrouter.engine.deadletter import DeadLetter
from eventrouter.record import Occurrence
from eventrouter.source.recording import read_recording
from eventrouter.source.tracker import OccurrenceTracker
from eventrouter.testing import event_object

DATA = Path(__file__).resolve().parents[1] / "eventrouter" / "testing" / "data"


def _occurrences() -> list[Occurrence]:
    tracker = OccurrenceTracker(cluster="rec")
    occs = []
    for line in (DATA / "watch-core-v1.jsonl").read_bytes().splitlines():
        watch = json.loads(line)
        if watch["type"] in ("ADDED", "MODIFIED") and (occ := tracker.observe(watch["object"])) is not None:
            occs.append(occ)
    return occs


def _pulled_before_the_first_event(lines: list[bytes]) -> int:
    pulled = 0

    def source() -> Iterator[bytes]:
        nonlocal pulled
        for line in lines:
            pulled += 1
            yield line

    for kind, _ in read_recording(source()):
        if kind not in ("MALFORMED", "REPAIRED", "DEADLETTER"):
            return pulled
    raise AssertionError("no event read")


def test_a_first_dead_letter_torn_after_a_comma_costs_that_line_not_the_whole_file_in_memory(
    tmp_path: Path,
) -> None:
    """Item 78 covered a cut in the middle. A cut right after a ``,`` (or a ``{``, ``[``) looked like
    the first line of a pretty-printed document, and the whole file was read at once: 3.4x the RSS
    of the intact file (87 → 288 MiB for 31 MB), beside the live router in its container."""
    path = tmp_path / "deadletter" / "file.jsonl"
    DeadLetter(path, sink="file").write([(occ, "HTTP 400: bad request") for occ in _occurrences()])
    letters = path.read_bytes().splitlines(keepends=True)
    watch = (DATA / "watch-core-v1.jsonl").read_bytes().splitlines(keepends=True)
    for lines in (letters, watch):
        first = lines[0]
        cuts = [i + 1 for i, byte in enumerate(first[:-1]) if byte in b",{["]
        assert len(cuts) > 20
        for cut in cuts:
            # The next start ends the fragment with a newline (item 126): it stays the first line.
            torn = [first[:cut] + b"\n", *lines[1:]]
            assert _pulled_before_the_first_event(torn) == 2, first[:cut][-60:]
    # What that heuristic is for still holds: a document over several lines is read whole.
    items = [json.loads(line)["object"] for line in _watch()[:3]]
    listing: dict[str, Any] = {"apiVersion": "v1", "kind": "List", "items": items}
    for text in (json.dumps(listing, indent=2), '{"apiVersion": "v1", "items": [\n' + _items(listing) + "]}"):
        got = list(read_recording(line + b"\n" for line in text.encode().split(b"\n")))
        assert got == [("LIST", item) for item in listing["items"]]


def _watch() -> list[bytes]:
    return (DATA / "watch-core-v1.jsonl").read_bytes().splitlines()


def _items(listing: dict[str, Any]) -> str:
    return ",\n".join(json.dumps(item) for item in listing["items"]) + "\n"


def test_a_repaired_dead_letter_is_named_by_its_event(caplog: pytest.LogCaptureFixture) -> None:
    """The warning named `event ?/? (uid ?)`: the namespace, name and uid are in the letter's event."""
    caplog.set_level(logging.WARNING)
    occ = _occurrences()[0]
    line = (  # as DeadLetter writes it, with a byte that is no UTF-8 in the event's message
        b'{"sink":"file","reason":"400","dead_lettered_at":1.0,"key":"'
        + occ.key.encode()
        + b'","record":'
        + occ.json
        + b',"event":'
        + occ.raw_json.replace(b'"message":"', b'"message":"\xff', 1)
        + b"}\n"
    )
    got = list(read_recording([line]))
    assert [kind for kind, _ in got] == ["REPAIRED", "DEADLETTER", "LIST"]
    meta = occ.raw["metadata"]
    assert f"(event {meta['namespace']}/{meta['name']} (uid {meta['uid']}))" in caplog.text
    assert "?/? (uid ?)" not in caplog.text


def test_the_ledger_records_only_keys_the_sink_answered_ok_for(tmp_path: Path) -> None:
    """A key goes into the ledger when a send of the sink answered OK for that very occurrence (it was
    inferred from checkpoint acknowledgements before, which also covered a number the pipeline had
    skipped as a copy). An answer the pipeline retries the whole batch for, or mends, records none:
    sent again, never lost."""
    from eventrouter.cli import _DeadLetterReplay
    from eventrouter.sink import OK, Outcome, reject, retry

    def letter(n: int) -> dict[str, Any]:
        return event_object(uid="u", count=n, last_timestamp=f"2024-05-01T10:00:0{n}Z")

    occs = {n: OccurrenceTracker(exact=True).observe(letter(n)) for n in (1, 2, 3, 4, 5, 6)}
    batch = [occ for occ in occs.values() if occ is not None]
    replay = _DeadLetterReplay(tmp_path, "file.jsonl", ["file"])
    assert all(replay.hand_on(letter(n)) for n in occs)
    replay.sent("file", batch[:2], None)  # None: all OK
    replay.sent("file", batch[2:4], [reject("400"), retry("503")])
    replay.sent("file", batch[4:], [OK])  # one outcome for two: the batch is retried
    replay.sent("file", batch[4:], [Outcome("ok"), OK])  # type: ignore[arg-type]  # a kind mended
    replay.sent("file", batch[4:], [OK, OK])
    recorded = (tmp_path / "file.replayed").read_text().splitlines()[1:]
    assert recorded == ["u/1", "u/2", "u/5", "u/6"]
    assert replay.outstanding["file"] == {"u/3", "u/4"}  # neither accepted nor refused (yet)
    # What the ledger holds is skipped by the next replay of any file in that folder.
    again = _DeadLetterReplay(tmp_path, "file.jsonl", ["file"])
    assert [again.hand_on(letter(n)) for n in occs] == [False, False, True, True, False, False]
    assert again.skipped["file"] == 4


def test_a_ledger_line_cut_by_a_kill_is_no_key(tmp_path: Path) -> None:
    """`u/1` left of `u/12` would make the next replay skip u/1, which was never accepted."""
    from eventrouter.cli import _Ledger

    path = tmp_path / "file.replayed"
    path.write_text("# header\nu/3\nu/1")
    ledger = _Ledger(path, "file")
    assert ledger.keys == {"u/3"} and path.read_text() == "# header\nu/3\n"
    ledger.add(["v/1"])
    assert _Ledger(path, "file").keys == {"u/3", "v/1"}
