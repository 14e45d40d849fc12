"""On ``PYTHONPATH`` of the router only when ``python -m bench.memory --census`` starts it: SIGUSR2 then
writes a pymalloc census of the router to ``$EVENTROUTER_BENCH_CENSUS`` (``bench/_census.py``)."""

import importlib.util
import os
import signal
from pathlib import Path

_path = os.environ.get("EVENTROUTER_BENCH_CENSUS")
if _path:
    # Loaded now, not in the handler: its import would allocate among the pools the census reads.
    _spec = importlib.util.spec_from_file_location(
        "_bench_census", Path(__file__).parent.parent / "_census.py"
    )
    assert _spec is not None and _spec.loader is not None
    _census = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_census)

    _report: str = _path

    def _on_signal(signum: int, frame: object) -> None:
        # Runs between two bytecodes of the router: an error must not propagate into its code.
        try:
            _census.write_report(_report)
        except Exception:  # reported to the bench in the file it waits for
            import traceback

            with open(_report, "w") as out:
                out.write("census failed:\n" + traceback.format_exc())

    signal.signal(signal.SIGUSR2, _on_signal)
