"""`eventrouter replay` of a dead-letter file can be run again: what the sink refuses again goes to a
file of its own beside the input, and what it accepted is recorded there and skipped by the next
replay. Before, the letters refused again were only a count and log lines ("no --data-dir: this log
is their only record", with --data-dir given), and running the replay again after its exit 1 sent
everything the first run had delivered a second time (237 records for 126 occurrences). The real
CLI against the project's webhook test receiver."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from eventrouter.engine.deadletter import DeadLetter
from eventrouter.source.tracker import OccurrenceTracker
from eventrouter.testing.receivers.webhook import WebhookReceiver

DATA = Path(__file__).resolve().parents[1] / "eventrouter" / "testing" / "data"


def _write_letters(path: Path, sink: str) -> tuple[list[str], set[str]]:
    """The recorded watch's 126 occurrences as dead letters of ``sink``: their keys, and those of the
    BackOff events among them."""
    tracker = OccurrenceTracker(cluster="rec")
    occs = []
    for line in (DATA / "watch-core-v1.jsonl").read_bytes().splitlines():
        watch = json.loads(line)
        if watch["type"] in ("ADDED", "MODIFIED") and (occ := tracker.observe(watch["object"])) is not None:
            occs.append(occ)
    assert DeadLetter(path, sink=sink).write([(occ, "HTTP 400: bad request") for occ in occs])
    return [occ.key for occ in occs], {occ.key for occ in occs if occ.record["reason"] == "BackOff"}


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "eventrouter.cli", "replay", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ,
    )


async def _replay(*args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    done = await asyncio.to_thread(_run, *args)
    return done, json.loads(done.stderr.strip().splitlines()[-1])


def _keys(hook: WebhookReceiver) -> list[str]:
    return [f"{r.json()['uid']}/{r.json()['occurrence']}" for r in hook.accepted]


async def test_a_dead_letter_replay_run_again_sends_only_what_the_sink_has_not_accepted(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    original = data / "deadletter" / "webhook.jsonl"
    keys, backoff = _write_letters(original, "webhook")
    assert len(keys) == 126 and 0 < len(backoff) < 126
    async with WebhookReceiver() as hook:
        sink = f"--sink=webhook:{hook.url}?mode=event&batch_max_wait=0.05"
        # The cause is partly fixed: the BackOff records are still refused.
        hook.fail_matching(lambda body: b'"reason":"BackOff"' in body, 400, body=b"still bad")
        first, summary = await _replay(str(original), sink, "--data-dir", str(data))
        assert first.returncode == 1, first.stderr
        row = summary["sinks"]["webhook"]
        assert row["delivered"] == 126 - len(backoff) and row["dead_lettered"] == len(backoff), row
        # Those refused again are in a file of their own beside the input, with the new reason.
        refused = Path(row["dead_letter_file"])
        assert refused.parent == original.parent and refused.name.startswith("webhook.jsonl.refused-")
        again = [json.loads(line) for line in refused.read_text().splitlines()]
        assert sorted(e["key"] for e in again) == sorted(backoff)
        assert all("still bad" in e["reason"] and e["sink"] == "webhook" and e["event"] for e in again)
        assert len(original.read_text().splitlines()) == 126  # the input as it was
        assert f"they are in {refused}" in first.stderr
        assert "no --data-dir" not in first.stderr  # it was given

        # Fixed: the operator runs the same command again. Only what was not accepted goes out.
        hook.fail_matching(None)
        second, summary = await _replay(str(original), sink, "--data-dir", str(data))
        assert second.returncode == 0, second.stderr
        row = summary["sinks"]["webhook"]
        assert row["delivered"] == len(backoff) and row["skipped"] == 126 - len(backoff), row
        # The file of those refused again, replayed as well, sends nothing twice.
        third, summary = await _replay(str(refused), sink)
        assert third.returncode == 0, third.stderr
        row = summary["sinks"]["webhook"]
        assert row["delivered"] == 0 and row["skipped"] == len(backoff), row
        delivered = _keys(hook)
    assert sorted(delivered) == sorted(keys)  # each occurrence once (237 records before)


async def test_a_dead_letter_replay_stopped_at_its_timeout_sends_only_the_rest_when_run_again(
    tmp_path: Path,
) -> None:
    """--timeout reached with part of the file refused for a while (503): exit 1. The replay says the
    rest is still in its input, not that it is "re-delivered after restart"; run again, it sends
    that rest only."""
    letters = tmp_path / "deadletter" / "webhook.jsonl"
    keys, backoff = _write_letters(letters, "webhook")
    async with WebhookReceiver() as hook:
        sink = f"--sink=webhook:{hook.url}?mode=event&batch_max_wait=0.05"
        hook.fail_matching(lambda body: b'"reason":"BackOff"' in body, 503, body=b"busy")
        first, summary = await _replay(str(letters), sink, "--timeout", "2")
        assert first.returncode == 1, first.stderr
        row = summary["sinks"]["webhook"]
        assert not summary["drained"] and row["dead_lettered"] == 0 and "dead_letter_file" not in row
        assert row["dropped"] >= len(backoff) and row["delivered"] + row["dropped"] == 126, row
        assert (
            f"still in {letters}, and a replay of it again sends it (what was delivered is skipped)"
            in first.stderr
        )
        hook.fail_matching(None)
        second, summary = await _replay(str(letters), sink)
        assert second.returncode == 0, second.stderr
        again = summary["sinks"]["webhook"]
        assert again["delivered"] == row["dropped"] and again["skipped"] == row["delivered"], again
        delivered = _keys(hook)
    assert sorted(delivered) == sorted(keys)


async def test_a_dead_letter_file_whose_last_line_is_being_written_is_no_success(tmp_path: Path) -> None:
    """The live router appends to the file while it is replayed: its last letter is half there. That
    line was counted malformed with exit 0, which invited removing the file; the letter, once whole,
    was then never sent."""
    letters = tmp_path / "deadletter" / "file.jsonl"
    keys, _ = _write_letters(letters, "file")
    whole = letters.read_bytes()
    last = whole.rstrip(b"\n").rfind(b"\n") + 1
    cut = last + (len(whole) - last) // 2
    letters.write_bytes(whole[:cut])
    out = tmp_path / "out.jsonl"
    first, summary = await _replay(str(letters), f"--sink=file:{out}")
    assert first.returncode == 1, first.stderr
    assert summary["last_line_incomplete"] and summary["malformed"] == 1, summary
    assert summary["sinks"]["file"]["delivered"] == 125
    assert "is not a whole dead letter (no newline at its end)" in first.stderr
    with letters.open("ab") as fh:  # the router's append ends
        fh.write(whole[cut:])
    second, summary = await _replay(str(letters), f"--sink=file:{out}")
    assert second.returncode == 0, second.stderr
    assert "last_line_incomplete" not in summary
    assert summary["sinks"]["file"]["delivered"] == 1 and summary["sinks"]["file"]["skipped"] == 125
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(f"{r['uid']}/{r['occurrence']}" for r in written) == sorted(keys)
