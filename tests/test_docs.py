"""The docs cannot drift: generated parts are current, every metric and record field is documented,
and the example sink in docs/writing-a-sink.md works as written."""

from __future__ import annotations

import importlib
import importlib.util
import re
import shutil
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import pytest
from prometheus_client import Counter, Histogram

from eventrouter.metrics import Metrics
from eventrouter.options import SinkOptions
from eventrouter.record import normalise
from eventrouter.testing import event_object, make_occurrence

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
REGEN = "python scripts/gen_docs.py"


def _gen_docs() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_docs_are_current(capsys: pytest.CaptureFixture[str]) -> None:
    rc = _gen_docs().main(["--check"])
    err = capsys.readouterr().err
    assert rc == 0, f"docs/sinks.md or the example in docs/record.md is stale: run `{REGEN}`.\n{err}"


def test_check_detects_a_stale_doc_and_regeneration_fixes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gen = _gen_docs()
    docs = tmp_path / "docs"
    docs.mkdir()
    shutil.copy(DOCS / "record.md", docs / "record.md")
    (docs / "sinks.md").write_text("# Sink options\n\nhand-edited\n", encoding="utf-8")
    assert gen.main(["--check", "--docs-dir", str(docs)]) == 1
    err = capsys.readouterr().err
    assert "sinks.md is stale" in err and REGEN in err
    assert gen.main(["--docs-dir", str(docs)]) == 0
    assert gen.main(["--check", "--docs-dir", str(docs)]) == 0
    assert (docs / "sinks.md").read_text(encoding="utf-8") == (DOCS / "sinks.md").read_text(encoding="utf-8")


def test_sinks_doc_lists_every_builtin_sink_and_prints_no_secret_default() -> None:
    from eventrouter.plugins import discover

    text = (DOCS / "sinks.md").read_text(encoding="utf-8")
    builtin = sorted(n for n, p in discover().items() if p.distribution == "eventrouter")
    assert builtin, "no built-in sinks are installed"
    for name in builtin:
        assert f"\n## {name}\n" in text, f"sink {name} missing from docs/sinks.md: run `{REGEN}`"
    secret_rows = 0
    for row in text.splitlines():
        cells = [c.strip() for c in row.split(" | ")]
        if len(cells) >= 4 and "Secret" in cells[2]:
            secret_rows += 1
            assert cells[3] == "—", f"a Secret default is printed: {row}"
    assert secret_rows >= 5, "no Secret option found in docs/sinks.md"


def _metric_families() -> list[tuple[str, str]]:
    """(exposed name, type) of every metric eventrouter/metrics.py defines."""
    metrics = Metrics()
    found = []
    for value in vars(metrics).values():
        if isinstance(value, Counter):
            found.append((value._name + "_total", "counter"))
        elif isinstance(value, Histogram):
            found.append((value._name, "histogram"))
        elif hasattr(value, "_name") and hasattr(value, "_type"):
            found.append((value._name, cast(Any, value)._type))
    return found


def test_every_metric_is_documented_with_its_type() -> None:
    text = (DOCS / "metrics.md").read_text(encoding="utf-8")
    families = _metric_families()
    assert len(families) >= 20
    for name, kind in families:
        row = next((line for line in text.splitlines() if line.startswith(f"| `{name}`")), None)
        assert row is not None, f"metric {name} is not in the docs/metrics.md table"
        assert f"| {kind} |" in row, f"docs/metrics.md gives {name} the wrong type (expected {kind})"


def test_metrics_doc_mentions_no_metric_that_does_not_exist() -> None:
    text = (DOCS / "metrics.md").read_text(encoding="utf-8")
    known = {name for name, _ in _metric_families()}
    suffixes = ("", "_bucket", "_sum", "_count")
    for used in set(re.findall(r"\beventrouter_[a-z_]+", text)):
        assert any(used == name + s for name in known for s in suffixes), f"unknown metric {used}"


def _documented_fields(text: str) -> set[str]:
    section = text.split("## Fields", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([a-z_.]+)` \|", section, flags=re.M))


def test_record_doc_lists_exactly_the_fields_normalise_produces() -> None:
    record = make_occurrence().to_dict(include_raw=True)
    produced = set(record) | {f"involved_object.{k}" for k in record["involved_object"]}
    documented = _documented_fields((DOCS / "record.md").read_text(encoding="utf-8"))
    assert produced - documented == set(), "fields missing from docs/record.md"
    assert documented - produced == set(), "docs/record.md documents fields normalise does not produce"


def test_record_doc_time_chain_matches_the_code() -> None:
    from eventrouter.record import _TIME_CHAIN

    text = (DOCS / "record.md").read_text(encoding="utf-8")
    chain = [f"{parent}.{key}" if parent else key for parent, key in _TIME_CHAIN]
    listed = re.findall(r"^\d\. `([A-Za-z.]+)`$", text, flags=re.M)
    assert listed == chain
    # And normalise follows that order: series.lastObservedTime wins over lastTimestamp.
    occ = make_occurrence(
        count=5, series_count=6, last_timestamp="2024-05-01T11:00:00Z", event_time="2024-05-01T11:00:07.5Z"
    )
    assert (occ.record["time"], occ.record["time_source"]) == ("2024-05-01T11:00:07.5Z", "event")


# ---- the example sink in docs/writing-a-sink.md -----------------------------------------------------


def _doc_files() -> dict[str, str]:
    text = (DOCS / "writing-a-sink.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```python file=(\S+)\n(.*?)^```$", text, flags=re.M | re.S)
    return dict(blocks)


def test_writing_a_sink_example_files_are_present() -> None:
    assert set(_doc_files()) == {"collector_sink.py", "test_collector_sink.py"}


async def test_writing_a_sink_example_tests_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, code in _doc_files().items():
        (tmp_path / name).write_text(code, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        module = importlib.import_module("test_collector_sink")
        tests = {n: f for n, f in vars(module).items() if n.startswith("test_") and callable(f)}
        assert len(tests) == 3
        for test in tests.values():
            await cast(Callable[[], Awaitable[None]], test)()
    finally:
        sys.modules.pop("test_collector_sink", None)
        sys.modules.pop("collector_sink", None)


def test_writing_a_sink_example_is_ruff_clean(tmp_path: Path) -> None:
    import subprocess

    for name, code in _doc_files().items():
        (tmp_path / name).write_text(code, encoding="utf-8")
    ruff = Path(sys.executable).parent / "ruff"
    result = subprocess.run(
        [
            str(ruff),
            "check",
            "--no-cache",
            "--line-length",
            "110",
            "--select",
            "E,F,W,B,UP,RUF",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---- docs/migration.md: the eventrouter configurations it shows are valid ---------------------------


def _eventrouter_blocks(lang: str) -> list[str]:
    text = (DOCS / "migration.md").read_text(encoding="utf-8")
    return re.findall(rf"^```{lang} eventrouter\n(.*?)^```$", text, flags=re.M | re.S)


def _set_referenced_env(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in re.findall(r"env:([A-Za-z_][A-Za-z0-9_]*)", text):
        monkeypatch.setenv(name, "doc-example-value")


def test_migration_yaml_example_is_a_valid_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    from eventrouter.config import RouterConfig, build_specs

    blocks = _eventrouter_blocks("yaml")
    assert blocks
    for block in blocks:
        _set_referenced_env(block, monkeypatch)
        cfg = RouterConfig.model_validate(yaml.safe_load(block))
        specs = build_specs([], cfg.sinks)
        assert [s.name for s in specs] == [str(e.get("name") or e["type"]) for e in cfg.sinks]


def test_migration_flag_examples_are_valid_and_match_the_yaml(monkeypatch: pytest.MonkeyPatch) -> None:
    import shlex

    import yaml

    from eventrouter.config import RouterConfig, build_specs

    blocks = _eventrouter_blocks("sh")
    assert blocks
    flags = [
        arg.split("=", 1)[1]
        for block in blocks
        for arg in shlex.split(block.replace("\\\n", " "))
        if arg.startswith("--sink=")
    ]
    assert flags
    _set_referenced_env(" ".join(flags), monkeypatch)
    from_flags = build_specs(flags)
    # The flags in the doc are said to be "the same sinks" as its YAML example.
    yaml_cfg = RouterConfig.model_validate(yaml.safe_load(_eventrouter_blocks("yaml")[0]))
    _set_referenced_env(_eventrouter_blocks("yaml")[0], monkeypatch)
    from_yaml = build_specs([], yaml_cfg.sinks)
    assert [(s.name, s.type, s.filter, s.pipeline) for s in from_flags] == [
        (s.name, s.type, s.filter, s.pipeline) for s in from_yaml
    ]
    for a, b in zip(from_flags, from_yaml, strict=True):
        assert a.options.model_dump(mode="json") == b.options.model_dump(mode="json")


@pytest.mark.parametrize(
    "flag",
    [
        "dingtalk:https://oapi.dingtalk.com/robot/send?access_token=T&sign=SEC1&label=prod&level=Warning"
        "&msg_type=markdown&cluster_id=c1&region=cn-shenzhen&namespaces=a,b&kinds=Pod&exclude_reasons=Pulled",
        "kafka:?brokers=k1:9092&brokers=k2:9092&eventstopic=heapster-events&compression=gzip&user=u&password=p"
        "&cacert=/ca.pem&cert=/c.pem&key=/k.pem&insecuressl=true",
        "elasticsearch:http://es:9200?nodes=http://es2:9200&index=heapster-{yyyy.MM.dd}&esUserName=u"
        "&esUserSecret=p&ver=6&pipeline=p1",
        "sls:https://sls.aliyuncs.com?project=P&logStore=S&topic=T&regionId=cn-hangzhou&internal=true"
        "&accessKeyId=a&accessKeySecret=b",
        "webhook:https://hooks.example/k8s?level=Warning&namespaces=a&kinds=Pod&header=Content-Type=application/json"
        "&method=PUT&mode=event",
        "wechat:?corp_id=ID&corp_secret=S&agent_id=1000012&to_user=alice,bob&label=x&level=Normal&namespaces=a"
        "&kinds=Pod",
    ],
)
def test_kube_eventer_options_the_guide_says_carry_over_are_accepted(flag: str, tmp_path: Path) -> None:
    from eventrouter.config import build_specs
    from eventrouter.testing.tls import certificate

    # File options must name files that are there, and TLS ones hold what OpenSSL loads: a
    # certificate (ca.pem, c.pem) and its key (k.pem).
    cert, key = certificate(tmp_path, name="client")
    for name, pem in (("ca.pem", cert), ("c.pem", cert), ("k.pem", key)):
        (tmp_path / name).write_bytes(pem.read_bytes())
        flag = flag.replace(f"=/{name}", f"={tmp_path / name}")
    assert len(build_specs([flag])) == 1


@pytest.mark.parametrize(
    "flag",
    [
        "kafka:?brokers=k1:9092&timeseriestopic=x",
        "elasticsearch:http://es:9200?sniff=false",
        "elasticsearch:http://es:9200?bulkWorkers=5",
        "elasticsearch:http://es:9200?cluster_name=prod",
        "sls:https://sls.aliyuncs.com?project=P&logStore=S&label=K,V",
        "webhook:https://hooks.example/k8s?method=GET",
    ],
)
def test_kube_eventer_options_the_guide_says_to_remove_are_refused(flag: str) -> None:
    from eventrouter.config import ConfigError, build_specs

    with pytest.raises(ConfigError):
        build_specs([flag])


def test_webhook_refuses_the_kube_eventer_keys_the_guide_says_to_remove_and_keeps_other_keys() -> None:
    from eventrouter.config import ConfigError, build_specs

    for key in ("reason=BackOff", "custom_body_configmap=b", "custom_body_configmap_namespace=kube-system"):
        with pytest.raises(ConfigError, match=f"option '{key.partition('=')[0]}'"):
            build_specs([f"webhook:https://hooks.example/k8s?{key}"])
    (spec,) = build_specs(["webhook:https://hooks.example/k8s?team=platform"])
    assert spec.options.url == "https://hooks.example/k8s?team=platform" and spec.filter.reasons == []


def test_sink_level_defaults_are_as_the_guide_says() -> None:
    from eventrouter.config import build_specs

    for flag in ("dingtalk:?access_token=T", "wechat:?corp_id=a&corp_secret=b&agent_id=1", "wecom:?key=k"):
        assert build_specs([flag])[0].filter.level == "Warning", flag
    for flag in ("webhook:https://h.example/", "kafka:?brokers=k:9092", "loki:http://loki:3100"):
        assert build_specs([flag])[0].filter.level is None, flag


# Stated in the alerting guide's "Shared by both robots" table in another form than one default.
ROBOT_DEFAULTS_NOT_LITERAL = {
    "msg_type": "markdown, but text for WeCom's application API: chosen by the sink",
    "min_interval": "60/rate_per_minute, derived",
    "max_message_bytes": "per robot and message type (the sinks' default_max_bytes)",
}


def _robot_defaults_table() -> dict[str, str]:
    """Option name → its default cell, from docs/alerting.md's "Shared by both robots" table."""
    text = (DOCS / "alerting.md").read_text(encoding="utf-8")
    table = text.split("\nShared by both robots:\n\n", 1)[1].split("\n\n", 1)[0]
    rows: dict[str, str] = {}
    for line in table.splitlines()[2:]:
        names, default = (cell.strip() for cell in line.strip("|").split(" | ")[:2])
        named = [n for n in re.findall(r"`(\w+)`", names) if "(" not in names or f"(`{n}`)" not in names]
        parts = default.split(", ") if len(named) > 1 and default.count(", ") == len(named) - 1 else None
        rows.update({name: parts[i] if parts else default for i, name in enumerate(named)})
    return rows


def _stated(cell: str, robot: str) -> str:
    """The default a cell states for one robot: `x`, or "DingTalk `x`, WeCom `y`"."""
    each = re.fullmatch(r"DingTalk `([^`]*)`, WeCom `([^`]*)`", cell)
    if each:
        return each.group(1) if robot == "dingtalk" else each.group(2)
    literal = re.fullmatch(r"`([^`]*)`", cell)
    if literal:
        return literal.group(1)
    assert cell in ("—", "none", "built in"), f"a default the test cannot read: {cell!r}"
    return ""


def _as_stated(default: Any) -> str:
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, float) and default.is_integer():
        return str(int(default))
    if isinstance(default, list):
        return ",".join(map(str, default))
    return "" if default is None else str(default)


@pytest.mark.parametrize("robot", ["dingtalk", "wecom"])
def test_alerting_guide_states_the_robots_option_defaults(robot: str) -> None:
    """Item 271: the guide gave DingTalk's throttle_backoff as 60 s, WeCom's; DingTalk's is 600."""
    from eventrouter_sinks.dingtalk import DingTalkOptions
    from eventrouter_sinks.wecom import WeComOptions

    models: dict[str, type[SinkOptions]] = {"dingtalk": DingTalkOptions, "wecom": WeComOptions}
    model = models[robot]
    rows = _robot_defaults_table()
    assert "throttle_backoff" in rows and "max_pending" in rows, sorted(rows)
    for name, cell in rows.items():
        assert name in model.model_fields, f"alerting.md documents {name!r}, no option of {robot}"
        if name in ROBOT_DEFAULTS_NOT_LITERAL:
            continue
        default = model.model_fields[name].get_default(call_default_factory=True)
        assert _stated(cell, robot) == _as_stated(default), f"alerting.md: {robot} {name} default"


def test_alerting_guide_states_each_robots_throttle_pause() -> None:
    from eventrouter_sinks.dingtalk import DingTalkOptions
    from eventrouter_sinks.wecom import WeComOptions

    text = (DOCS / "alerting.md").read_text(encoding="utf-8")
    (row,) = [line for line in text.splitlines() if line.startswith("| DingTalk `130101`")]
    for robot, model in (("DingTalk", DingTalkOptions), ("WeCom", WeComOptions)):
        pause = model.model_fields["throttle_backoff"].get_default()
        assert re.search(rf"{robot} {pause:g}\b", row), f"alerting.md: {robot}'s throttle_backoff {pause:g}"


# Where the docs describe the Event object as the router passes it on: the line naming it.
RAW_EVENT_DOCS = {
    "record.md": "| `raw` | object |",
    "writing-a-sink.md": "`occ.raw` is the Event object",
    "dead-letters.md": "`event` (the Event object",
    "migration.md": "`{{raw.metadata.resourceVersion}}`",
}


def test_the_docs_say_the_raw_event_is_without_managed_fields() -> None:
    """Item 271: `raw`, `occ.raw` and the dead letter's `event` were documented as the Event "exactly as
    received"; `metadata.managedFields` is always removed (memory: it is often larger than the event)."""
    obj = event_object(uid="u-managed")
    obj["metadata"]["managedFields"] = [{"manager": "kubelet", "operation": "Update"}]
    occ = normalise(obj)
    assert "managedFields" not in occ.raw["metadata"]
    assert b"managedFields" not in occ.encode(include_raw=True)
    for name, marker in RAW_EVENT_DOCS.items():
        text = (DOCS / name).read_text(encoding="utf-8")
        assert text.count(marker) == 1, f"{name}: {marker!r} not found once"
        said = text.split(marker, 1)[1].split("\n\n", 1)[0].split("\n|", 1)[0]
        assert "managedFields" in said.split(". ", 1)[0], f"{name} does not say managedFields is removed"


def test_alerting_guide_says_a_held_digest_repeat_is_no_retry() -> None:
    """Item 271: the guide sent operators to "the retry metrics with a reason `held for the digest`": a
    hold is not counted (tests/sinks/test_dingtalk.py::test_retry_max_attempts_counts_a_robots_failures_
    but_not_its_digest_holds) and the counter has no reason label."""
    text = (DOCS / "alerting.md").read_text(encoding="utf-8")
    paragraph = text.split("The cost is that an alert held", 1)[1].split("\n\n", 1)[0]
    named = set(re.findall(r"`(eventrouter_\w+)`", paragraph))
    assert named and named <= {name for name, _ in _metric_families()}, named
    assert "counts neither in `eventrouter_sink_retries_total`" in paragraph
    assert Metrics().retries._labelnames == ("sink",) and "with a reason" not in paragraph
