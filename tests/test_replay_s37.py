"""Session 37, review-c F1-F3: `eventrouter replay` of dead letters stopped by a signal, run twice at
once, and given a file whose last letter a kill cut. The real CLI (subprocesses), the real
``DeadLetter`` and the project's webhook test receiver; the documented procedure run as written."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from test_replay_dead_letters_again import _keys, _write_letters
from test_replay_dead_letters_safely import ROOT, _ledger, _replay

from eventrouter.engine.deadletter import DeadLetter
from eventrouter.record import Occurrence
from eventrouter.testing.factories import recorded_occurrences
from eventrouter.testing.receivers.webhook import WebhookReceiver

CLI = [sys.executable, "-m", "eventrouter.cli", "replay"]


def _config(tmp_path: Path, hook: WebhookReceiver) -> Path:
    config = tmp_path / "config.yaml"
    config.write_text(
        f"sinks:\n  - type: webhook\n    name: webhook\n    url: {hook.url}\n    mode: event\n"
        "    batch_max_wait: 0.05\n"
    )
    return config


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
async def test_a_replay_stopped_by_a_signal_records_what_was_accepted_and_prints_its_summary(
    tmp_path: Path, sig: signal.Signals
) -> None:
    """F3: Ctrl-C cancelled the send in flight (webhook mode=event: a request a letter), so what the
    webhook had accepted of it was not recorded, the next run sent it again (40 of 126 twice), and no
    summary was printed; SIGTERM and SIGHUP killed the process. Now each stops as --timeout does."""
    folder = tmp_path / "deadletter"
    taken = folder / "webhook.taken-20261207T000000Z.2"
    keys, _ = _write_letters(taken, "webhook")
    async with WebhookReceiver(delay=0.03) as hook:
        config = _config(tmp_path, hook)
        first = await asyncio.create_subprocess_exec(
            *CLI, str(taken), f"--config={config}", stderr=asyncio.subprocess.PIPE, env=os.environ
        )
        await hook.wait_for(40, within=60)
        first.send_signal(sig)
        async with asyncio.timeout(60):
            err = (await first.communicate())[1].decode()
        assert first.returncode == 128 + sig, err[-3000:]
        summary = json.loads(err.strip().splitlines()[-1])
        assert summary["stopped_by"] == sig.name and not summary["drained"], summary
        received = _keys(hook)
        assert 40 <= len(received) < len(keys)
        assert sorted(_ledger(folder / "webhook.replayed")) == sorted(received)
        assert summary["sinks"]["webhook"]["delivered"] == len(received), summary
        rc, summary, err = await _replay(str(taken), f"--config={config}")
        assert rc == 0, err[-3000:]
        assert summary["sinks"]["webhook"]["skipped"] == len(received), summary
        delivered = _keys(hook)
    assert sorted(delivered) == sorted(keys)  # each once


async def test_a_second_replay_of_the_same_folder_and_sink_at_once_refuses_and_sends_nothing(
    tmp_path: Path,
) -> None:
    """F2: two replays at once each read the ledger at their start and each sent every letter (252
    requests for 126 letters, both exit 0). The second now cannot take the folder's lock: exit 2."""
    folder = tmp_path / "deadletter"
    taken = folder / "webhook.taken-20261207T000000Z.2"
    keys, _ = _write_letters(taken, "webhook")
    ledger = folder / "webhook.replayed"
    async with WebhookReceiver(delay=0.05) as hook:
        config = _config(tmp_path, hook)
        first = await asyncio.create_subprocess_exec(
            *CLI, str(taken), f"--config={config}", stderr=asyncio.subprocess.PIPE, env=os.environ
        )
        await hook.wait_for(5, within=60)  # the first is sending: it holds the lock
        rc, summary, err = await _replay(str(taken), f"--config={config}")
        running = first.returncode is None
        async with asyncio.timeout(120):
            first_err = (await first.communicate())[1].decode()
        assert rc == 2 and summary == {}, err[-3000:]
        assert running, "the first replay ended before the second one was refused: no overlap tested"
        assert "it holds the lock on that folder" in err and "nothing was sent" in err, err[-3000:]
        assert f"another replay of the dead letters in {folder} is running" in err
        assert first.returncode == 0, first_err[-3000:]
        delivered = _keys(hook)
    assert sorted(delivered) == sorted(keys)  # each once
    assert sorted(_ledger(ledger)) == sorted(keys)


def _cut_batch(tmp_path: Path, path: Path, occs: Sequence[Occurrence], fraction: float) -> bytes:
    """Append the start of a batch of dead letters to ``path``, as a SIGKILL during its write left it;
    returns the bytes appended."""
    scratch = tmp_path / "scratch.jsonl"
    scratch.unlink(missing_ok=True)
    assert DeadLetter(scratch, sink="webhook").write([(occ, "HTTP 400") for occ in occs])
    batch = scratch.read_bytes()
    cut = batch[: int(len(batch) * fraction)]
    with path.open("ab") as fh:
        fh.write(cut)
    return cut


def _whole_keys(*paths: Path) -> list[str]:
    keys = []
    for path in paths:
        for line in path.read_bytes().splitlines(keepends=True):
            if line.endswith(b"\n"):
                try:
                    keys.append(json.loads(line)["key"])
                except ValueError:
                    continue
    return keys


async def _documented_loop(
    tmp_path: Path, folder: Path, hook: WebhookReceiver
) -> subprocess.CompletedProcess[str]:
    """docs/dead-letters.md's shell block, as written, for sink `webhook`."""
    doc = (ROOT / "docs" / "dead-letters.md").read_text()
    block = re.search(r"## Sending them again.*?```sh\n(.*?)```", doc, re.S)
    assert block is not None
    flags = tmp_path / "sink-flags"
    flags.write_text("")
    script = (
        block.group(1)
        .replace("/var/lib/eventrouter/deadletter", str(folder))
        .replace("/etc/eventrouter/config.yaml", str(_config(tmp_path, hook)))
        .replace("/etc/eventrouter/sink-flags", str(flags))
        .replace("<sink>", "webhook")
    )
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    wrapper = bin_dir / "eventrouter"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m eventrouter.cli "$@"\n')
    wrapper.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    return await asyncio.to_thread(
        subprocess.run, ["sh", "-c", script], env=env, capture_output=True, text=True, timeout=300
    )


async def test_a_rotation_ends_a_line_a_kill_cut_and_the_documented_loop_gets_past_it(tmp_path: Path) -> None:
    """F1 (a): a router killed while appending a letter, restarted, rotates its file at the bound: the
    cut line went into `.1` unended, whose replay then exited 1 at every pass (waiting for the rest of
    a line nothing writes any more), and the documented loop never replayed the newer file."""
    folder = tmp_path / "deadletter"
    folder.mkdir()
    path = folder / "webhook.jsonl"
    occs = recorded_occurrences()
    first = DeadLetter(path, sink="webhook", max_bytes=19_000)
    for occ in occs[:10]:
        assert first.write([(occ, "HTTP 400")])
    _cut_batch(tmp_path, path, occs[10:12], 0.75)  # SIGKILL mid-append
    restarted = DeadLetter(path, sink="webhook", max_bytes=19_000)
    for occ in occs[12:20]:
        assert restarted.write([(occ, "HTTP 400")])
    older = folder / "webhook.jsonl.1"
    assert older.exists() and older.read_bytes().endswith(b"\n")
    whole = _whole_keys(older, path)
    assert {occ.key for occ in occs[12:20]} <= set(whole) and len(whole) >= 18
    async with WebhookReceiver() as hook:
        done = await _documented_loop(tmp_path, folder, hook)
        delivered = _keys(hook)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(delivered) == sorted(whole)  # both files, each letter once
    assert not [p.name for p in folder.iterdir() if ".taken-" in p.name]


async def test_a_taken_file_whose_last_letter_a_kill_cut_keeps_the_fragment_and_replays_the_rest(
    tmp_path: Path,
) -> None:
    """F1 (b): killed mid-append, the file taken (the documented `mv`) before the router wrote again:
    exit 1 at every run before (`last_line_incomplete`), for ever. Now the fragment is kept in
    `<file>.torn`, named with its offset in the summary and the log, and the rest is replayed, exit 0."""
    folder = tmp_path / "deadletter"
    folder.mkdir()
    path = folder / "webhook.jsonl"
    occs = recorded_occurrences()
    assert DeadLetter(path, sink="webhook").write([(occ, "HTTP 400") for occ in occs[:5]])
    offset = path.stat().st_size
    cut = _cut_batch(tmp_path, path, [occs[5]], 0.5)
    taken = folder / "webhook.taken-20261207T000000Z.2"
    path.rename(taken)
    async with WebhookReceiver() as hook:
        config = _config(tmp_path, hook)
        rc, summary, err = await _replay(str(taken), f"--config={config}")
        assert rc == 0, err[-3000:]
        kept = Path(f"{taken}.torn")
        assert summary["torn_last_line"] == {"offset": offset, "bytes": len(cut), "kept_in": str(kept)}
        assert summary["malformed"] == 1 and "last_line_incomplete" not in summary, summary
        assert kept.read_bytes() == cut
        assert f"at byte offset {offset}" in err and occs[5].key in err, err[-3000:]
        again, summary, err = await _replay(str(taken), f"--config={config}")
        assert again == 0 and summary["sinks"]["webhook"]["skipped"] == 5, err[-3000:]
        delivered = _keys(hook)
    assert sorted(delivered) == sorted(occ.key for occ in occs[:5])


async def test_a_rotated_file_holding_only_a_letter_a_kill_cut_is_no_failure(tmp_path: Path) -> None:
    """F1 (c): killed during the first append to a fresh file, the restarted router's first batch not
    fitting beside the fragment: `.1` holds that fragment alone, read as a recording of which nothing
    could be read, exit 1 at every run."""
    folder = tmp_path / "deadletter"
    folder.mkdir()
    path = folder / "webhook.jsonl"
    occs = recorded_occurrences()
    cut = _cut_batch(tmp_path, path, [occs[0]], 0.5)
    restarted = DeadLetter(path, sink="webhook", max_bytes=len(cut) + 10)
    assert restarted.write([(occs[1], "HTTP 400")])
    older = folder / "webhook.jsonl.1"
    assert older.read_bytes() == cut + b"\n"
    taken = folder / "webhook.taken-20261207T000000Z.1"
    older.rename(taken)
    async with WebhookReceiver() as hook:
        rc, summary, err = await _replay(str(taken), f"--config={_config(tmp_path, hook)}")
        assert not hook.accepted
    assert rc == 0, err[-3000:]
    assert summary["malformed"] == 1 and summary["occurrences"] == 0, summary
    assert "holds only parts of dead letters cut short by a kill" in err and "line 1 is not JSON" in err
