"""Dead letters discarded by a rotation are counted (``deadletter_rotated``) from the file as it is, not
as this process last wrote it (session 30, finding 5 of a review of the local outputs). An operator who
replayed ``<sink>.jsonl.1`` and removed it, as the rotation's log line suggests, got the next
rotation counting its letters as discarded again: phantom drops, and EventrouterDroppedEvents."""

from __future__ import annotations

import os
from pathlib import Path

from eventrouter.engine.deadletter import DeadLetter
from eventrouter.testing import make_occurrence


def on_disk(path: Path) -> int:
    return sum(len(f.read_bytes().splitlines()) for f in (path, path.with_suffix(".jsonl.1")) if f.exists())


def test_letters_the_operator_removed_or_pruned_are_not_counted_as_discarded(tmp_path: Path) -> None:
    path = tmp_path / "webhook.jsonl"
    discarded: list[int] = []
    occs = [make_occurrence(message=f"m{i:03d}".ljust(400, ".")) for i in range(16)]
    sample = tmp_path / "sample.jsonl"
    DeadLetter(sample, sink="webhook").write([(occs[0], "400 mapping error")])
    line = sample.stat().st_size  # each letter's, within a few bytes
    sample.unlink()
    dl = DeadLetter(path, sink="webhook", max_bytes=3 * line + line // 2, on_discard=discarded.append)
    removed = 0

    def write(i: int) -> None:
        assert dl.write([(occs[i], "400 mapping error")])
        assert on_disk(path) + sum(discarded) + removed == i + 1  # every letter accounted for

    for i in range(7):  # three a file: the 7th rotation discards letters 0-2
        write(i)
    assert sum(discarded) == 3 and on_disk(path) == 4
    # The operator replays the rotated file, then removes it.
    older = path.with_suffix(".jsonl.1")
    removed += len(older.read_bytes().splitlines())
    older.unlink()
    for i in range(7, 10):  # the next rotation finds no rotated file: nothing discarded
        write(i)
    assert sum(discarded) == 3, discarded
    # The operator prunes the rotated file to one letter (a new file in its place, and in place).
    for in_place in (False, True):
        letters = older.read_bytes().splitlines(keepends=True)
        removed += len(letters) - 1
        if in_place:
            with older.open("r+b") as f:
                f.truncate(len(letters[0]))
        else:
            (tmp_path / "pruned").write_bytes(letters[0])
            os.replace(tmp_path / "pruned", older)
        before = sum(discarded)
        for i in range(10 + 3 * in_place, 13 + 3 * in_place):  # the third rotates
            write(i)
        assert sum(discarded) - before == 1, discarded  # the one letter left in it, not three
