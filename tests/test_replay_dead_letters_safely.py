"""A dead-letter replay records what the sink answered OK for, keeps one file of letters refused again
per input and sink (within the room the router's data dir has), is run on files taken from the
router, and refuses an input whose letters go to different sinks. The real CLI against the project's
webhook test receiver (item 231's review: F1-F5)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from eventrouter.engine.deadletter import DeadLetter
from eventrouter.record import Occurrence
from eventrouter.source.tracker import OccurrenceTracker
from eventrouter.testing import event_object
from eventrouter.testing.factories import recorded_occurrences
from eventrouter.testing.receivers.webhook import WebhookReceiver

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "eventrouter" / "testing" / "data"


def _occurrence(uid: str, count: int, last: str, **fields: Any) -> Occurrence:
    obj = event_object(uid=uid, count=count, first_timestamp="2024-05-01T09:00:00Z", **fields)
    obj["lastTimestamp"] = f"2024-05-01T{last}Z"
    occ = OccurrenceTracker(cluster="c", exact=True).observe(obj)
    assert occ is not None
    return occ


def _run(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "eventrouter.cli", "replay", *args],
        input=stdin,
        capture_output=True,
        timeout=120,
        env=os.environ,
    )


async def _replay(*args: str, stdin: bytes | None = None) -> tuple[int, dict[str, Any], str]:
    done = await asyncio.to_thread(_run, *args, stdin=stdin)
    err = done.stderr.decode()
    last = err.strip().splitlines()[-1]
    return done.returncode, json.loads(last) if last.startswith("{") else {}, err


def _keys(hook: WebhookReceiver) -> list[str]:
    return [f"{r.json()['uid']}/{r.json()['occurrence']}" for r in hook.accepted]


def _ledger(path: Path) -> list[str]:
    return (
        [line for line in path.read_text().splitlines() if not line.startswith("#")] if path.exists() else []
    )


def _letter_keys(path: Path) -> list[str]:
    return [json.loads(line)["key"] for line in path.read_bytes().splitlines()]


async def test_a_letter_the_pipeline_skips_as_a_copy_is_not_recorded_as_accepted_nor_counted_delivered(
    tmp_path: Path,
) -> None:
    """U/5 is older than U/3 (the writer's clock stepped back): handed on oldest first, U/5 was
    accepted, and the pipeline skipped U/3 as a copy of it. The ledger, inferred from the checkpoint's
    acknowledgement (U → 5), recorded U/3 all the same: exit 0, and every later replay skipped it."""
    letters = tmp_path / "deadletter" / "webhook.jsonl"
    u5, u3, v1 = (
        _occurrence("U", 5, "10:00:00"),
        _occurrence("U", 3, "10:00:10"),
        _occurrence("V", 1, "10:00:05"),
    )
    assert DeadLetter(letters, sink="webhook").write([(u5, "400"), (u3, "400"), (v1, "400")])
    ledger = letters.parent / "webhook.replayed"
    async with WebhookReceiver() as hook:
        sink = f"--sink=webhook:{hook.url}?mode=event&batch_max_wait=0.05&batch_max_events=1"
        rc, summary, err = await _replay(str(letters), sink)
        received = _keys(hook)
        assert set(_ledger(ledger)) <= set(received), (_ledger(ledger), received)
        assert "U/3" in received or rc == 1, err
        if "U/3" not in received:
            assert summary["sinks"]["webhook"]["not_sent"] == 1, summary
            assert "U/3" in err.split("neither accepted nor refused")[1]
        # Run again, it sends what is missing, and nothing twice.
        rc, summary, err = await _replay(str(letters), sink)
        assert rc == 0, err
        assert sorted(_keys(hook)) == ["U/3", "U/5", "V/1"]
        assert sorted(_ledger(ledger)) == ["U/3", "U/5", "V/1"]


async def test_a_replay_refused_alike_again_and_again_keeps_one_file_of_the_letters_refused_again(
    tmp_path: Path,
) -> None:
    """Each run that got the letters refused again wrote a new full copy of them beside the input,
    never rotated nor removed: in the live data dir, outside its budget."""
    letters = tmp_path / "deadletter" / "webhook.jsonl"
    occs = recorded_occurrences()
    keys = [occ.key for occ in occs]
    assert DeadLetter(letters, sink="webhook").write([(occ, "HTTP 400: bad request") for occ in occs])
    refused = letters.parent / "webhook.jsonl.refused-webhook.jsonl"
    async with WebhookReceiver() as hook:
        sink = f"--sink=webhook:{hook.url}?mode=event&batch_max_wait=0.05"
        for run in range(3):
            hook.fail_matching(lambda body: True, 400, body=f"refused in run {run}".encode())
            rc, summary, err = await _replay(str(letters), sink)
            assert rc == 1, err
            (copy,) = (p for p in letters.parent.iterdir() if p != letters)  # one beside the input
            assert copy.stat().st_size <= 1.1 * letters.stat().st_size
            assert sorted(_letter_keys(copy)) == sorted(keys)
            assert all(
                f"refused in run {run}" in json.loads(line)["reason"]
                for line in copy.read_bytes().splitlines()
            )
        assert copy == refused and summary["sinks"]["webhook"]["dead_letter_file"] == str(refused)
        # Half fixed: the refused file replayed itself, all the way, holds what is still refused.
        backoff = {occ.key for occ in occs if occ.record["reason"] == "BackOff"}
        hook.fail_matching(lambda body: b'"reason":"BackOff"' in body, 400, body=b"still bad")
        rc, summary, err = await _replay(str(refused), sink)
        assert rc == 1, err
        assert sorted(_letter_keys(refused)) == sorted(backoff)
        assert _letter_keys(letters) == keys  # the input as it was
        assert sorted(_keys(hook)) == sorted(set(keys) - backoff)


def _data_dir(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    data = tmp_path / "data"
    letters = data / "deadletter" / "webhook.jsonl"
    occs = recorded_occurrences()
    assert DeadLetter(letters, sink="webhook").write([(occ, "HTTP 400: bad request") for occ in occs])
    (data / "lock").write_text("")  # a router's data dir
    return data, letters, [occ.key for occ in occs]


async def test_a_replay_that_may_not_fit_in_the_routers_data_dir_is_refused_before_it_sends_anything(
    tmp_path: Path,
) -> None:
    """The letters refused again and the file sorted by time go beside the input: in the router's
    data dir, where an emptyDir past its limit gets the pod evicted with the spools and dead letters."""
    _, letters, keys = _data_dir(tmp_path)
    size = letters.stat().st_size
    async with WebhookReceiver() as hook:
        sink = f"--sink=webhook:{hook.url}?mode=event&batch_max_wait=0.05"
        # 3 x its size: less the file itself and the router's 20 % reserve, 1.4 x is left; 2 x is needed.
        rc, _, err = await _replay(str(letters), sink, f"--data-dir-max-bytes={3 * size}")
        assert rc == 2, err
        assert "--data-dir-max-bytes" in err and "nothing was sent" in err
        assert not hook.accepted
        rc, _, err = await _replay(str(letters), sink, f"--data-dir-max-bytes={5 * size}")
        assert rc == 0, err
        assert sorted(_keys(hook)) == sorted(keys)


async def test_letters_refused_again_from_stdin_that_do_not_fit_are_named_not_written(tmp_path: Path) -> None:
    """From stdin the size is not known before: each write of letters refused again into the router's
    data dir is checked; what does not fit is named in the log, and the replay exits 1."""
    data, letters, keys = _data_dir(tmp_path)
    size = letters.stat().st_size
    budget = 2 * size  # less the input and the router's 20 % reserve: 0.6 x its size is left
    async with WebhookReceiver() as hook:
        sink = f"--sink=webhook:{hook.url}?mode=event&batch_max_wait=0.05&batch_max_events=10"
        hook.fail_matching(lambda body: True, 400, body=b"bad")
        rc, summary, err = await _replay(
            "-", sink, f"--data-dir={data}", f"--data-dir-max-bytes={budget}", stdin=letters.read_bytes()
        )
    assert rc == 1, err
    (refused,) = (data / "deadletter").glob("stdin.refused-*")
    written = _letter_keys(refused)
    assert summary["sinks"]["webhook"]["dead_lettered"] == len(keys)
    assert 0 < len(written) < len(keys), len(written)
    assert refused.name == "stdin.refused-webhook.jsonl"
    named: set[str] = set()
    for line in err.splitlines():
        if "cannot be written, this log is the only record" in line:
            named.update(re.findall(r"[0-9a-f-]{36}/\d+", line))
    assert named == set(keys) - set(written)
    used = sum(p.stat().st_size for p in data.rglob("*") if p.is_file())
    assert used <= 0.8 * budget


async def test_the_documented_procedure_removes_only_letters_it_replayed_while_the_router_writes(
    tmp_path: Path,
) -> None:
    """docs/dead-letters.md's commands, run as written while the router gives letters up (and rotates
    its file) before and after each replay; then each file a replay exited 0 for is removed, as the
    procedure said. Replayed in place, that removed letters the router wrote after the replay read the
    end of the file, and a file rotated into `.1` before it was replayed."""
    doc = (ROOT / "docs" / "dead-letters.md").read_text()
    block = re.search(r"## Sending them again.*?```sh\n(.*?)```", doc, re.S)
    assert block is not None
    folder = tmp_path / "deadletter"
    folder.mkdir()
    # The router's bound: its first 10 letters, so that writes of 3 rotate the file.
    scratch = tmp_path / "scratch.jsonl"
    assert DeadLetter(scratch, sink="webhook").write(
        [(occ, "HTTP 400") for occ in recorded_occurrences()[:10]]
    )
    bound = scratch.stat().st_size + 100
    given = folder.parent / "given.json"
    given.write_text("[]")
    router = tmp_path / "router.py"
    router.write_text(
        f"""import json
from pathlib import Path
from eventrouter.engine.deadletter import DeadLetter
from eventrouter.source.tracker import OccurrenceTracker

def give_up(n):
    tracker = OccurrenceTracker(cluster="rec")
    occs = []
    for line in Path({str(DATA / "watch-core-v1.jsonl")!r}).read_bytes().splitlines():
        watch = json.loads(line)
        if watch["type"] in ("ADDED", "MODIFIED") and (occ := tracker.observe(watch["object"])) is not None:
            occs.append(occ)
    given = json.loads(Path({str(given)!r}).read_text())
    batch = occs[len(given) : len(given) + n]
    letters = DeadLetter(Path({str(folder / "webhook.jsonl")!r}), sink="webhook", max_bytes={bound})
    for occ in batch:  # given up one at a time
        assert letters.write([(occ, "HTTP 400")])
    Path({str(given)!r}).write_text(json.dumps(given + [occ.key for occ in batch]))
"""
    )
    runs = tmp_path / "runs.jsonl"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "eventrouter"
    wrapper.write_text(
        f"""#!{sys.executable}
import json, subprocess, sys
sys.path.insert(0, {str(tmp_path)!r})
from router import give_up
give_up(3)  # before the replay reads the file
done = subprocess.run([{sys.executable!r}, "-m", "eventrouter.cli", *sys.argv[1:]])
give_up(3)  # after it read the end of the file
with open({str(runs)!r}, "a") as fh:
    fh.write(json.dumps({{"file": sys.argv[2], "rc": done.returncode}}) + "\\n")
sys.exit(done.returncode)
"""
    )
    wrapper.chmod(0o755)
    # 15 letters: 10 or more in .1, the rest in .jsonl.
    await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", "from router import give_up; give_up(15)"],
        cwd=tmp_path,
        check=True,
    )
    assert (folder / "webhook.jsonl.1").exists() and (folder / "webhook.jsonl").exists()
    async with WebhookReceiver() as hook:
        config = tmp_path / "config.yaml"
        config.write_text(
            f"sinks:\n  - type: webhook\n    name: webhook\n    url: {hook.url}\n    mode: event\n"
            "    batch_max_wait: 0.05\n"
        )
        flags = tmp_path / "sink-flags"  # the chart's, without sinks.flags
        flags.write_text("")
        script = (
            block.group(1)
            .replace("/var/lib/eventrouter/deadletter", str(folder))
            .replace("/etc/eventrouter/config.yaml", str(config))
            .replace("/etc/eventrouter/sink-flags", str(flags))
            .replace("<sink>", "webhook")
        )
        assert "/etc/" not in script and "/var/" not in script, script
        env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
        done = await asyncio.to_thread(
            subprocess.run, ["sh", "-c", script], cwd=tmp_path, env=env, capture_output=True, timeout=300
        )
        assert runs.exists(), done.stderr.decode()
        ran = [json.loads(line) for line in runs.read_text().splitlines()]
        assert len(ran) == 2 and all(run["rc"] == 0 for run in ran), (ran, done.stderr.decode())
        for run in ran:  # "once each file's replay exits 0, remove the files"
            (folder / run["file"]).unlink(missing_ok=True)
        delivered = _keys(hook)
    written = json.loads(given.read_text())
    assert len(written) == 27
    kept = set()
    for path in folder.iterdir():
        if path.suffix != ".replayed":
            kept.update(_letter_keys(path))
    assert set(written) - set(delivered) - kept == set()  # none deleted unseen
    assert len(delivered) == len(set(delivered)) >= 15


async def test_a_rerun_sends_nothing_when_each_letter_is_in_the_ledger_of_every_sink_whose_filter_keeps_it(
    tmp_path: Path,
) -> None:
    """The letters of `loki` sent to two on purpose (`--to`): `a` keeps Warnings only. A letter `a`'s
    filter keeps out is in no ledger of `a`, and went to `b` again at every run, after an exit 0."""
    letters = tmp_path / "deadletter" / "loki.jsonl"
    occs = [
        _occurrence(f"u{i}", 1, f"10:00:{i:02d}", type="Warning" if i % 2 else "Normal", object_name=f"p{i}")
        for i in range(10)
    ]
    assert DeadLetter(letters, sink="loki").write([(occ, "400") for occ in occs])
    async with WebhookReceiver() as a, WebhookReceiver() as b:
        sinks = [
            f"--sink=webhook:{a.url}?name=a&mode=event&batch_max_wait=0.05&types=Warning",
            f"--sink=webhook:{b.url}?name=b&mode=event&batch_max_wait=0.05",
            "--to=a",
            "--to=b",
        ]
        rc, summary, err = await _replay(str(letters), *sinks)
        assert rc == 0, err
        assert len(a.accepted) == 5 and len(b.accepted) == 10
        rc, summary, err = await _replay(str(letters), *sinks)
        assert rc == 0, err
        assert summary["sinks"]["a"]["delivered"] == summary["sinks"]["b"]["delivered"] == 0, summary
        assert summary["sinks"]["a"]["skipped"] == 5 and summary["sinks"]["a"]["filtered"] == 5
        assert summary["sinks"]["b"]["skipped"] == 10
        assert len(a.accepted) == 5 and len(b.accepted) == 10


async def test_dead_letters_of_two_sinks_that_go_to_different_sinks_in_one_input_are_refused(
    tmp_path: Path,
) -> None:
    """`cat a.jsonl b.jsonl | eventrouter replay -`: every letter went to `a`, exit 0, and `b`'s keys
    went into `a`'s ledger."""
    folder = tmp_path / "deadletter"
    first = [_occurrence(f"a{i}", 1, f"10:00:{i:02d}", object_name=f"a{i}") for i in range(5)]
    second = [_occurrence(f"b{i}", 1, f"10:01:{i:02d}", object_name=f"b{i}") for i in range(5)]
    assert DeadLetter(folder / "a.jsonl", sink="a").write([(occ, "400") for occ in first])
    assert DeadLetter(folder / "b.jsonl", sink="b").write([(occ, "400") for occ in second])
    both = (folder / "a.jsonl").read_bytes() + (folder / "b.jsonl").read_bytes()
    async with WebhookReceiver() as a, WebhookReceiver() as b:
        sinks = [
            f"--sink=webhook:{a.url}?name=a&mode=event&batch_max_wait=0.05",
            f"--sink=webhook:{b.url}?name=b&mode=event&batch_max_wait=0.05",
        ]
        rc, _, err = await _replay("-", *sinks, f"--data-dir={tmp_path}", stdin=both)
        assert rc == 2, err
        assert "dead letters of a and of b, which go to different sinks here" in err
        assert not a.accepted and not b.accepted
        assert not (folder / "a.replayed").exists()
        # Sent to one sink on purpose (`--to`), the letters of both may share an input.
        rc, summary, err = await _replay("-", sinks[0].replace("name=a", "name=c"), "--to=c", stdin=both)
        assert rc == 0, err
        assert summary["sinks"]["c"]["delivered"] == 10
