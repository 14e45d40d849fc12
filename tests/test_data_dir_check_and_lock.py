"""The data dir from `check` and from a file system without locks (session 30, minor points of a
review of the local outputs): `check --offline --data-dir` made the folders (a validation's side
effect, as item 199 removed for the file sink), and a flock failing with ENOLCK (NFS without lockd)
ended `run` and `replay` in a traceback instead of a configuration error naming the data dir."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

RECORDING = Path(__file__).parents[1] / "eventrouter" / "testing" / "data" / "watch-core-v1.jsonl"


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "eventrouter.cli", *args]


@pytest.mark.parametrize("offline", [True, False], ids=["offline", "online"])
def test_check_makes_no_data_dir_and_still_refuses_one_it_could_not_make(
    tmp_path: Path, offline: bool
) -> None:
    wanted = tmp_path / "volume" / "a" / "b"
    mode = ["--offline"] if offline else []
    proc = subprocess.run(
        cli("check", *mode, "--data-dir", str(wanted), "--sink=stdout:"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "volume").exists()
    (tmp_path / "volume").write_text("a file where the folder would be")
    proc = subprocess.run(
        cli("check", *mode, "--data-dir", str(wanted), "--sink=stdout:"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"--data-dir {wanted}: cannot write there" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace to fail flock(2)")
def test_a_data_dir_that_cannot_be_locked_exits_2_naming_it(tmp_path: Path) -> None:
    data = tmp_path / "data"
    proc = subprocess.run(
        [
            *("strace", "-f", "-qq", "-e", "trace=flock", "-e", "inject=flock:error=ENOLCK"),
            *("-o", str(tmp_path / "trace.txt")),
            *cli("replay", str(RECORDING), "--data-dir", str(data), "--sink=stdout:"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if proc.returncode != 0 and "ptrace" in proc.stderr:
        pytest.skip("ptrace not permitted here")
    assert "INJECTED" in (tmp_path / "trace.txt").read_text()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert f"--data-dir {data}: cannot lock {data / 'lock'} (No locks available)" in proc.stderr
    assert proc.stdout == ""  # nothing replayed without the lock
