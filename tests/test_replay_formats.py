"""`eventrouter replay` of the formats a recording comes in beyond core/v1 JSON lines and Lists:
events.k8s.io watches, `kubectl get events -w -o json`, and a file of which nothing can be read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from eventrouter.testing import recorded_list

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
