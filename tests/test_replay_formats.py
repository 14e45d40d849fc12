"""`eventrouter replay` of the formats a recording comes in beyond core/v1 JSON lines and Lists:
events.k8s.io watches, `kubectl get events -w -o json`, and a file of which nothing can be read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from eventrouter.engine.deadletter import DeadLetter
from eventrouter.source.tracker import OccurrenceTracker
from eventrouter.testing import event_object, recorded_list

DATA = Path(__file__).resolve().parents[1] / "eventrouter" / "testing" / "data"


def _replay(recording: Path, out: Path) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:
    done = subprocess.run(
        [sys.executable, "-m", "eventrouter.cli", "replay", str(recording), f"--sink=file:{out}"],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ,
    )
    records = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    return done, records


def test_an_events_k8s_io_watch_recording_replays_as_the_core_v1_one(tmp_path: Path) -> None:
    core, core_records = _replay(DATA / "watch-core-v1.jsonl", tmp_path / "core.jsonl")
    events, records = _replay(DATA / "watch-events-v1.jsonl", tmp_path / "events.jsonl")
    assert core.returncode == 0 and events.returncode == 0, events.stderr
    assert len(records) == 126  # 102 before: the `deprecatedCount` raises were lost
    assert {(r["uid"], r["occurrence"]) for r in records} == {
        (r["uid"], r["occurrence"]) for r in core_records
    }
    assert all(r["message"] and r["involved_object"]["kind"] for r in records)


def test_kubectl_watch_json_output_replays_every_object(tmp_path: Path) -> None:
    """What `kubectl get events -A -w -o json > file` writes: the objects pretty-printed one after
    another. It delivered nothing, with exit 0."""
    items = recorded_list()["items"]
    recording = tmp_path / "kubectl-w.json"
    recording.write_text("".join(json.dumps(item, indent=4) + "\n" for item in items))
    done, records = _replay(recording, tmp_path / "out.jsonl")
    assert done.returncode == 0, done.stderr
    assert {r["uid"] for r in records} == {item["metadata"]["uid"] for item in items}
    summary = json.loads(done.stderr.strip().splitlines()[-1])
    assert summary["malformed"] == 0 and summary["occurrences"] == len(records) > 0


def test_a_replay_of_which_nothing_could_be_read_exits_1(tmp_path: Path) -> None:
    """A format replay does not read gave `"occurrences": 0, "malformed": N` and exit 0: a script
    took it for a replay that went well."""
    recording = tmp_path / "events.yaml"
    recording.write_text("apiVersion: v1\nkind: EventList\nitems: []\n")
    done, records = _replay(recording, tmp_path / "out.jsonl")
    summary = json.loads(done.stderr.strip().splitlines()[-1])
    assert summary["occurrences"] == 0 and summary["malformed"] == 3 and not records
    assert done.returncode == 1, done.stderr
    # An empty file is no failure: there was nothing to replay.
    (tmp_path / "empty.jsonl").write_text("")
    done, _ = _replay(tmp_path / "empty.jsonl", tmp_path / "out2.jsonl")
    assert done.returncode == 0, done.stderr


def test_a_dead_letter_file_out_of_number_order_replays_every_occurrence_it_holds(tmp_path: Path) -> None:
    """A dead-letter file is in the order its sink gave up: (uid, 5) refused at once, (uid, 3) retried
    and given up later. The replay skipped 3 (a dead letter lost on replay) and counted it as
    "its writer lowered the count"; and 3 handed on after 5 was accepted is skipped as a copy."""

    def occurrence(uid: str, count: int, last: str, name: str = "web") -> Any:
        obj = event_object(object_name=name, uid=uid, count=count, first_timestamp="2024-05-01T10:00:00Z")
        obj["lastTimestamp"] = last
        return OccurrenceTracker(cluster="c").observe(obj)

    # A: 3 happened before 5. B: 3 and 5 within one second (the same lastTimestamp).
    a5, a3 = occurrence("a", 5, "2024-05-01T10:00:05Z"), occurrence("a", 3, "2024-05-01T10:00:03Z")
    b5, b3 = (occurrence("b", n, "2024-05-01T10:00:04Z", name="db") for n in (5, 3))
    others = [occurrence(f"o{i}", 1, "2024-05-01T10:00:01Z", name=f"o{i}") for i in range(300)]
    path = tmp_path / "deadletter" / "file.jsonl"
    letters = DeadLetter(path, sink="file")
    letters.write([(a5, "400 refused at once"), (b5, "400 refused at once")])
    letters.write([(occ, "400") for occ in others])
    letters.write([(a3, "retries exhausted"), (b3, "retries exhausted"), (a5, "400 again")])
    out = tmp_path / "out.jsonl"
    done = subprocess.run(  # one occurrence per batch: 3 waits behind an accepted 5 if it comes after it
        [
            sys.executable,
            "-m",
            "eventrouter.cli",
            "replay",
            str(path),
            f"--sink=file:{out}?batch_max_events=1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ,
    )
    assert done.returncode == 0, done.stderr
    keys = [(r["uid"], r["occurrence"]) for r in map(json.loads, out.read_text().splitlines())]
    assert sorted(k for k in keys if k[0] in "ab") == [("a", 3), ("a", 5), ("b", 3), ("b", 5)]
    assert len(keys) == len(set(keys)) == 304  # every distinct (uid, number) it holds, once
    summary = json.loads(done.stderr.strip().splitlines()[-1])
    assert summary["occurrences"] == 304 and summary["sinks"]["file"]["skipped"] == 0, summary
    assert "lowered the count" not in done.stderr
