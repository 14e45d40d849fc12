"""The data dir's lock file when this user may not write it (session 32, a review of the stdout and
file sinks): left by a router that ran as another user (root, before the image moved to a non-root
uid), it ended `run` and `replay` in a PermissionError traceback while `check` said valid. flock needs
no write access: the file is opened to read and locked, and one router per data dir still holds.
The real `eventrouter replay`; as root, without the capability that lets root write any file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from eventrouter.datalock import DataDirLock

RECORDING = Path(__file__).parent.parent / "eventrouter" / "testing" / "data" / "watch-core-v1.jsonl"
STALE = "eventrouter pid 1 on the-old-pod since 2024-05-01T10:00:00Z\n"


def replay(data: Path) -> subprocess.CompletedProcess[str]:
    """`eventrouter replay` of the recording (126 occurrences) to stdout, as a user that may read but
    not write ``data/lock`` (the file is 0444; root loses CAP_DAC_OVERRIDE for it)."""
    unprivileged = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    command = [sys.executable, "-m", "eventrouter.cli", "replay", str(RECORDING), "--data-dir", str(data)]
    return subprocess.run(
        [*unprivileged, *command, "--sink=stdout:"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=data.parent,
    )


def test_a_lock_file_this_user_may_only_read_is_locked_all_the_same(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    lock = data / "lock"
    lock.write_text(STALE)
    lock.chmod(0o444)
    done = replay(data)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert len(done.stdout.splitlines()) == 126
    assert lock.read_text() == STALE  # not written: it could not be
    # Still one router per data dir: the one holding the lock keeps the other out.
    held = DataDirLock(data)
    held.acquire()
    try:
        refused = replay(data)
    finally:
        held.release()
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert f"data dir {data} is in use by eventrouter pid " in refused.stderr
    assert refused.stdout == "" and "Traceback" not in refused.stderr


def test_a_lock_file_this_user_may_not_even_read_exits_2_naming_it(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    lock = data / "lock"
    lock.touch()
    lock.chmod(0)
    refused = replay(data)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert (
        f"--data-dir {data}: cannot open {lock} (Permission denied; owned by uid {os.getuid()}, mode 0000"
        in (refused.stderr)
    )
    assert "chown" in refused.stderr and "Traceback" not in refused.stderr and refused.stdout == ""
