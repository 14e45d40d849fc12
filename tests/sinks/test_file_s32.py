"""file sink (session 32, a review of the stdout and file sinks): a rotation that cannot rename the
current file (a file mounted on its own: docker -v file:file, a Kubernetes subPath mount) removed one
more backup at every attempt and stalled saying "cannot write"; `check` passed such a path; and
`file_mode` was reduced by the umask. The mount points are real: a bind mount in a mount namespace of
the test's own (`unshare --map-root-user --mount`, which needs no root)."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

from eventrouter import OK, SinkContext
from eventrouter.testing import make_occurrence
from eventrouter_sinks.file import FileOptions, FileSink


def in_mount_namespace(host: Path, target: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` with ``host`` bind-mounted over ``target``, in a mount namespace of its own."""
    return subprocess.run(
        [
            *("unshare", "--map-root-user", "--mount", "sh", "-c"),
            'mount --bind "$1" "$2" && shift 2 && exec "$@"',
            *("sh", str(host), str(target), *argv),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "eventrouter.cli", *args]


MOUNTED_CHILD = textwrap.dedent(
    """
    import asyncio, json, logging, subprocess, sys
    from pathlib import Path
    from eventrouter import SinkContext
    from eventrouter.testing import make_occurrence
    from eventrouter_sinks.file import FileOptions, FileSink

    def occ(i):
        return make_occurrence(
            uid=f"00000000-0000-0000-0000-{i:012d}", name=f"ev-{i:06d}", message=f"m{i:06d}".ljust(2000, ".")
        )

    async def main():
        host, target = Path(sys.argv[1]), Path(sys.argv[2])
        ctx = SinkContext(name="file", cluster="c", data_dir=None, logger=logging.getLogger("file"))
        options = FileOptions.model_validate({"path": str(target), "max_bytes": "64Ki", "max_files": 3})
        sink = FileSink(options, ctx)
        await sink.start()  # refused on a mount point: the file is mounted over once started
        subprocess.run(["mount", "--bind", str(host), str(target)], check=True)
        report, sent, folder = [], 0, target.parent
        for _ in range(4):  # the engine's retries: the file is full, each needs a rotation
            outcomes = await sink.send([occ(sent + k) for k in range(40)])
            ok = sum(o.kind.name == "OK" for o in outcomes)
            sent += ok
            files = {p.name: p.read_text() for p in folder.iterdir() if p.name.startswith("events.jsonl.")}
            report.append({"ok": ok, "reasons": sorted({o.reason for o in outcomes if o.reason}), "files": files})
        subprocess.run(["umount", str(target)], check=True)  # mounted the folder instead: it rotates
        rest = [occ(sent + k) for k in range(40)]
        report.append({"ok": sum(o.kind.name == "OK" for o in await sink.send(rest)), "sent": sent + 40})
        await sink.aclose()
        print(json.dumps(report))

    asyncio.run(main())
    """
)


def test_a_rotation_that_cannot_rename_the_file_removes_no_backup_and_says_so(tmp_path: Path) -> None:
    """The review's rot_ebusy.py: the backups were shifted before the current file's rename failed
    (EBUSY), so each retry removed one more (.1 and .2 after two sends), and the reason said "cannot
    write". Now the current file is renamed first: no backup moves, and the reason says what to do."""
    host, folder = tmp_path / "host-events.jsonl", tmp_path / "log"
    host.touch()
    folder.mkdir()
    target = folder / "events.jsonl"
    backups = {f"events.jsonl.{i}": f'{{"old_backup":{i}}}\n' for i in (1, 2, 3)}
    for name, text in backups.items():
        (folder / name).write_text(text)
    proc = subprocess.run(
        [
            "unshare",
            "--map-root-user",
            "--mount",
            sys.executable,
            "-c",
            MOUNTED_CHILD,
            str(host),
            str(target),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    *stuck, after = json.loads(proc.stdout)
    assert [s["ok"] for s in stuck] == [24, 0, 0, 0]  # lines before the rotation OK, then none
    for attempt in stuck:
        assert attempt["files"] == backups  # nothing moved, nothing removed, however often tried
        [reason] = attempt["reasons"]
        assert reason.startswith(f"cannot rotate {target} (renaming events.jsonl to events.jsonl.rotating)")
        assert "Device or resource busy" in reason and "mount point" in reason
        assert "mount its folder instead" in reason and "max_bytes=0" in reason
    assert after["ok"] == 40  # once the file can be renamed, the sink goes on
    # Every record once: the 24 in the mounted file, the rest in the file under the mount point
    # and its rotations; the oldest backup went as any rotation with max_files=3 removes it.
    files = [host, folder / "events.jsonl.1", target]
    uids = [json.loads(line)["uid"] for p in files for line in p.read_text().splitlines()]
    assert uids == [f"00000000-0000-0000-0000-{i:012d}" for i in range(after["sent"])]
    assert (folder / "events.jsonl.2").read_text() == backups["events.jsonl.1"]
    assert (folder / "events.jsonl.3").read_text() == backups["events.jsonl.2"]


START_CHILD = textwrap.dedent(
    """
    import asyncio, logging, sys
    from eventrouter import SinkContext, SinkError
    from eventrouter_sinks.file import FileOptions, FileSink

    async def main():
        ctx = SinkContext(name="file", cluster="c", data_dir=None, logger=logging.getLogger("file"))
        sink = FileSink(FileOptions.model_validate({"path": sys.argv[1], "max_bytes": sys.argv[2]}), ctx)
        try:
            await sink.start()
        except SinkError as exc:
            print(exc)
        else:
            print("started")
        await sink.aclose()

    asyncio.run(main())
    """
)


def test_check_and_start_refuse_a_mounted_file_while_rotation_is_on(tmp_path: Path) -> None:
    """`check` and `start` passed a file mounted on its own, which no rotation can rename: the sink
    delivered until the file reached max_bytes, then never again. Both refuse it now (a start refused
    is retried by its pipeline, logged), naming both ways out; with max_bytes=0 (never rotate) it is
    fine, and so is a file not mounted."""
    host, target = tmp_path / "host-events.jsonl", tmp_path / "events.jsonl"
    host.touch()
    target.touch()
    refusal = f"file sink cannot rotate {target}: it is a mount point"
    ways_out = "mount its folder instead, or set max_bytes=0 never to rotate it"
    check = in_mount_namespace(host, target, *cli("check", f"--sink=file:{target}"))
    assert check.returncode == 1 and check.stdout.startswith("FAIL  file (file "), check
    assert "file sink cannot rotate " in check.stdout and ": it is a mount point" in check.stdout
    assert ways_out in check.stdout
    start = in_mount_namespace(host, target, sys.executable, "-c", START_CHILD, str(target), "100Mi")
    assert start.stdout.startswith(refusal) and ways_out in start.stdout, start
    assert (
        in_mount_namespace(host, target, *cli("check", f"--sink=file:{target}?max_bytes=0")).returncode == 0
    )
    never = in_mount_namespace(host, target, sys.executable, "-c", START_CHILD, str(target), "0")
    assert never.stdout == "started\n", never
    plain = subprocess.run(cli("check", f"--sink=file:{target}"), capture_output=True, text=True, timeout=60)
    assert plain.returncode == 0, plain


async def test_file_mode_is_the_mode_of_new_files_whatever_the_umask(tmp_path: Path) -> None:
    """file_mode=0664 gave 0644 under the usual umask 022: a group-writable mode was not applied."""
    target = tmp_path / "events.jsonl"
    kept = tmp_path / "kept.jsonl"
    kept.touch()
    kept.chmod(0o600)
    occs = [make_occurrence(message=f"m{i}".ljust(40_000, ".")) for i in range(3)]
    old = os.umask(0o022)
    try:
        ctx = SinkContext(name="file", cluster="c", data_dir=None, logger=logging.getLogger("test.file"))
        sink = FileSink(FileOptions.model_validate({"path": str(target), "file_mode": "0664"}), ctx)
        # Rotated at each record: the file made by a rotation gets the mode too.
        sink = FileSink(sink.options.model_copy(update={"max_bytes": 50_000}), ctx)
        await sink.start()
        assert await sink.send(occs) == [OK] * 3
        await sink.aclose()
        other = FileSink(FileOptions.model_validate({"path": str(kept), "file_mode": "0664"}), ctx)
        await other.start()
        await other.aclose()
    finally:
        os.umask(old)
    for name in ("events.jsonl", "events.jsonl.1", "events.jsonl.2"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o664, name
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600  # a file there already keeps its mode


async def test_the_default_file_mode_leaves_the_umask_alone(tmp_path: Path) -> None:
    """Without ``file_mode`` set, a new file is 0644 less the umask, as open(2) makes it: the first
    version of the exact mode fchmod'ed every new file to the default 0644, so an operator's umask
    077 no longer kept the events private (a review of item 249)."""
    target = tmp_path / "events.jsonl"
    old = os.umask(0o077)
    try:
        ctx = SinkContext(name="file", cluster="c", data_dir=None, logger=logging.getLogger("test.file"))
        sink = FileSink(FileOptions.model_validate({"path": str(target)}), ctx)
        await sink.start()
        assert await sink.send([make_occurrence()]) == [OK]
        await sink.aclose()
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
