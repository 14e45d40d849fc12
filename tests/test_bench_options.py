"""The benches' shared ``--sink-option SINK:NAME=VALUE`` parser (bench/_common.py ``sink_options``)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Run where the benches run (the repository's root on sys.path): the package does not install bench/.
SCRIPT = textwrap.dedent(
    """
    import json, sys
    from bench._common import sink_options
    from eventrouter.config import build_specs

    try:
        options = sink_options(json.loads(sys.argv[1]))
    except SystemExit as exc:
        print(json.dumps({"error": str(exc)}))
        raise SystemExit(0)
    # Each query as the benches add it to a sink's flag, read by the router's own parser.
    specs = build_specs([f"{sink}:http://127.0.0.1:9/x?{query}" for sink, query in options.items()
                         if sink in ("loki", "webhook")])
    print(json.dumps({"options": options,
                      "read": {s.name: s.options.model_dump(mode="json") | s.pipeline.model_dump(mode="json")
                               for s in specs}}))
    """
)


def _run(values: list[str]) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(values)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(json.loads(out.stdout))


def test_options_of_one_sink_are_joined_and_read_by_the_router_as_that_sinks_options() -> None:
    got = _run(["loki:new_stream_pushes=false", "loki=batch_max_events=50", "webhook:mode=batch"])
    assert got["options"] == {"loki": "new_stream_pushes=false&batch_max_events=50", "webhook": "mode=batch"}
    read = got["read"]
    assert isinstance(read, dict)
    assert read["loki"]["new_stream_pushes"] is False and read["loki"]["batch_max_events"] == 50
    assert read["webhook"]["mode"] == "batch"


def test_a_malformed_option_or_an_unknown_sink_is_refused_naming_it() -> None:
    for value in ("loki", "loki:new_stream_pushes", "lokii:x=1", ":x=1"):
        got = _run([value])
        assert "--sink-option wants SINK:NAME=VALUE" in str(got["error"]) and repr(value) in str(got["error"])
