"""A dead-letter replay sends the letters to their own sink, or to the sinks `--to` names: the letters
of a sink not configured here went to every configured sink, exit 0 (session 32's operator review,
F1: in the chart's pod, `replay --config` alone sent a `sinks.flags` webhook's letters to stdout, and
the documented loop removed the file). `--sink-flags` reads the router's own flags from a file, as
the chart renders them. The real CLI against the project's webhook test receiver."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from eventrouter.engine.deadletter import DeadLetter
from eventrouter.record import Occurrence
from eventrouter.testing.factories import recorded_occurrences
from eventrouter.testing.receivers.webhook import WebhookReceiver

DATA = Path(__file__).resolve().parents[1] / "eventrouter" / "testing" / "data"
CHART_CONFIG = "sinks:\n- name: stdout\n  type: stdout\n"  # the chart's default config.yaml


def _letters(path: Path, sink: str, occs: list[Occurrence]) -> list[str]:
    assert DeadLetter(path, sink=sink).write([(occ, "webhook answered 400") for occ in occs])
    return [occ.key for occ in occs]


async def _replay(*args: str, stdin: bytes | None = None) -> tuple[int, dict[str, Any], str, bytes]:
    """Exit code, the summary (the last line on stderr), stderr, and stdout (the stdout sink's)."""
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "eventrouter.cli", "replay", *args],
        input=stdin,
        capture_output=True,
        timeout=120,
        env=os.environ,
    )
    err = done.stderr.decode()
    last = err.strip().splitlines()[-1] if err.strip() else ""
    return done.returncode, json.loads(last) if last.startswith("{") else {}, err, done.stdout


def _keys(hook: WebhookReceiver) -> set[str]:
    return {f"{item['uid']}/{item['occurrence']}" for r in hook.accepted for item in r.json()}


async def test_letters_of_a_sink_given_only_as_a_flag_are_not_sent_to_the_config_files_sinks(
    tmp_path: Path,
) -> None:
    """The review's scenario: a webhook from `sinks.flags` refused everything; the chart's loop
    replayed its letters with `--config` (stdout only). Now: exit 2, nothing sent anywhere, the file
    as it was and nothing written beside it; given the router's flags (`--sink-flags`, as the chart
    renders them, or `--sink`), every letter reaches the webhook."""
    folder = tmp_path / "deadletter"
    letters = folder / "webhook.taken-1.2"
    keys = _letters(letters, "webhook", recorded_occurrences())
    before = letters.read_bytes()
    config = tmp_path / "config.yaml"
    config.write_text(CHART_CONFIG)
    async with WebhookReceiver() as hook:
        rc, summary, err, out = await _replay(str(letters), f"--config={config}")
        assert rc == 2, err
        assert "dead letters of sink 'webhook', which is not configured here (configured: stdout)" in err
        assert "--sink-flags" in err and "--to NAME" in err and "nothing was sent" in err
        assert summary == {} and out == b""  # no stdout record: nothing went to the stdout sink
        assert not hook.requests
        assert letters.read_bytes() == before
        assert sorted(p.name for p in folder.iterdir()) == [letters.name]

        flags = tmp_path / "sink-flags"
        flags.write_text(f"# the pod's --sink args\n\nwebhook:{hook.url}?mode=batch&batch_max_wait=0.05\n")
        rc, summary, err, out = await _replay(str(letters), f"--config={config}", f"--sink-flags={flags}")
        assert rc == 0, err
        assert list(summary["sinks"]) == ["webhook"], summary  # to that sink only: stdout got nothing
        assert summary["sinks"]["webhook"]["delivered"] == len(keys) == 126
        assert _keys(hook) == set(keys) and out == b""
        assert (folder / "webhook.replayed").exists()

    # The same flag given as --sink: everything was accepted already (the ledger), nothing sent again.
    async with WebhookReceiver() as again:
        flag = f"--sink=webhook:{again.url}?mode=batch&batch_max_wait=0.05"
        rc, summary, err, _ = await _replay(str(letters), f"--config={config}", flag)
        assert rc == 0, err
        assert summary["sinks"]["webhook"]["skipped"] == 126 and not again.requests


async def test_to_sends_the_letters_to_the_sinks_it_names_and_only_to_configured_ones(tmp_path: Path) -> None:
    """The sink renamed (`hook` → `webhook`): sending its letters elsewhere is said, with `--to`."""
    letters = tmp_path / "deadletter" / "hook.jsonl"
    keys = _letters(letters, "hook", recorded_occurrences()[:20])
    async with WebhookReceiver() as hook, WebhookReceiver() as other:
        sinks = [
            f"--sink=webhook:{hook.url}?mode=batch&batch_max_wait=0.05",
            f"--sink=webhook:{other.url}?name=other&mode=batch&batch_max_wait=0.05",
        ]
        rc, _, err, _ = await _replay(str(letters), *sinks, "--to=nosuch")
        assert rc == 2, err
        assert "--to nosuch: no sink of that name is configured here (configured: webhook, other)" in err
        rc, _, err, _ = await _replay(str(letters), *sinks)
        assert rc == 2 and "dead letters of sink 'hook', which is not configured here" in err, err
        assert not hook.requests and not other.requests

        rc, summary, err, _ = await _replay(str(letters), *sinks, "--to=webhook")
        assert rc == 0, err
        assert list(summary["sinks"]) == ["webhook"] and _keys(hook) == set(keys)
        assert not other.requests


async def test_an_input_with_letters_of_a_sink_not_configured_after_others_sends_nothing(
    tmp_path: Path,
) -> None:
    """`cat a.jsonl b.jsonl | eventrouter replay -` with `a` configured and `b` not: all went to `a`."""
    occs = recorded_occurrences()
    folder = tmp_path / "deadletter"
    _letters(folder / "a.jsonl", "a", occs[:5])
    _letters(folder / "b.jsonl", "b", occs[5:10])
    both = (folder / "a.jsonl").read_bytes() + (folder / "b.jsonl").read_bytes()
    async with WebhookReceiver() as a:
        sink = f"--sink=webhook:{a.url}?name=a&mode=batch&batch_max_wait=0.05"
        rc, _, err, _ = await _replay("-", sink, f"--data-dir={tmp_path}", stdin=both)
        assert rc == 2, err
        assert "dead letters of sink 'b', which is not configured here (configured: a)" in err
        assert not a.requests and not (folder / "a.replayed").exists()


async def test_to_is_refused_for_a_recording_and_an_unreadable_sink_flags_file(tmp_path: Path) -> None:
    recording = DATA / "watch-core-v1.jsonl"
    rc, _, err, out = await _replay(str(recording), "--sink=stdout", "--to=stdout")
    assert rc == 2 and "--to chooses where dead letters go" in err and out == b"", err
    missing = tmp_path / "sink-flags"
    rc, _, err, out = await _replay(str(recording), f"--sink-flags={missing}")
    assert rc == 2 and f"--sink-flags: cannot read {str(missing)!r}" in err and out == b"", err
