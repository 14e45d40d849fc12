"""The pymalloc census that `python -m bench.memory --census` runs inside the router (bench/_census.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# A process with a sparse arena whose survivors are the keys of a str-keyed dict held by an object's
# attribute (the collector does not show such keys: the census reads them itself).
SCRIPT = textwrap.dedent(
    """
    import sys
    from bench._census import write_report

    class Tracker:
        def __init__(self):
            self.seen = {}

    tracker = Tracker()
    junk = []
    for i in range(200_000):
        text = "%036d" % i
        junk.append(text)
        if i % 4000 == 0:
            tracker.seen[text] = i
        if i % 2000 == 0:
            junk.append(["filler"] * 20)  # other size classes, so that whole pools come free
    del junk
    write_report(sys.argv[1])
    """
)


def test_the_census_names_the_dict_that_holds_the_survivors_of_a_sparse_arena(tmp_path: Path) -> None:
    report = tmp_path / "census.txt"
    subprocess.run([sys.executable, "-c", SCRIPT, str(report)], cwd=ROOT, check=True, timeout=120)
    text = report.read_text()
    assert text.startswith("arenas current ")
    sparse = next(line for line in text.splitlines() if line.startswith("sparse arenas"))
    assert not sparse.endswith(": 0 []")
    held = [line for line in text.splitlines() if "<__main__.Tracker>.seen" in line]
    assert held and held[0].split()[1] == "str"
