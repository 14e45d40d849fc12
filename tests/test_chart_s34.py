"""The chart faults of session 34's review (items 280, 281, 290) and the chart's part of item 286 (the
checkpoint seed): values the router refuses that installed, the Role of a watched namespace named like
a YAML literal, and the upgrades that turn leader election on or switch the checkpoint mode.

The `lookup` of the live Deployment is empty without a cluster (helm-python renders client-side):
a copy of the chart redefines `eventrouter.liveWorkload`, the one template that calls it, to return
the Deployment the previous revision rendered.
"""

from __future__ import annotations

import collections
import json
import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml
from chart_helpers import BASE, CHART, FULLNAME, NAMESPACE, Doc, chart_with, docs, notes, sink_flag
from chart_helpers import render as render_text

from eventrouter.cli import _parser
from eventrouter.config import ConfigError, build_spec, build_specs, parse_sink_flag
from eventrouter.plugins import discover
from eventrouter.record import occurrence_number
from eventrouter.testing import FakeApiServer, event_object
from eventrouter.testing.chart_pod import ChartPod
from eventrouter.testing.waiting import until

CHECKPOINT = f"{FULLNAME}-checkpoint"
TO_DATA_DIR: dict[str, Any] = {"checkpoint": {"mode": "dataDir"}, "persistence": {"enabled": True}}


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: helm.Chart, values: Doc | None = None) -> list[Doc]:
    return docs(render_text(chart, values))


def deployment(docs: list[Doc]) -> Doc:
    (found,) = [d for d in docs if d["kind"] == "Deployment"]
    return found


def named(docs: list[Doc], kind: str, name: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]


def args(docs: list[Doc]) -> list[str]:
    return list(deployment(docs)["spec"]["template"]["spec"]["containers"][0]["args"])


def granted(role: Doc) -> set[tuple[str, str]]:
    return {
        (verb, name)
        for rule in role["rules"]
        for verb in rule["verbs"]
        for name in rule.get("resourceNames", [""])
    }


def chart_with_live(tmp: Path, live: Doc) -> Path:
    """A copy of the chart whose `lookup` of the release's workload finds `live`."""
    return chart_with(tmp / "chart-with-live", "eventrouter.liveWorkload", yaml.safe_dump(live))


# --- F5: watchNamespaces ------------------------------------------------------------------------


def test_a_watched_namespace_named_like_a_yaml_literal_gets_its_role_in_that_namespace(
    chart: helm.Chart,
) -> None:
    """`namespace: null` put the Role in the release namespace (the router got 403 for ever), `on`
    and `123` made a boolean and a number Kubernetes refuses."""
    names = ["payments", "null", "on", "yes", "true", "123", "0x1f", "1e3"]
    docs = render(chart, {"watchNamespaces": names})
    for kind in ("Role", "RoleBinding"):
        placed = [
            d["metadata"]["namespace"]
            for d in docs
            if d["kind"] == kind and d["metadata"]["name"] == f"{FULLNAME}-events"
        ]
        assert placed == names, kind


@pytest.mark.parametrize("entry", [None, True, 123], ids=["null", "bool", "number"])
def test_a_watched_namespace_that_is_no_string_is_refused_naming_it(
    chart: helm.Chart, entry: Any, tmp_path: Path
) -> None:
    with pytest.raises(helm.HelmValuesError, match=r"'/watchNamespaces/1': got \w+, want string"):
        render(chart, {"watchNamespaces": ["payments", entry]})
    # Without the schema (helm --skip-schema-validation) the template says what to do.
    copy = tmp_path / CHART.name
    shutil.copytree(CHART, copy)
    (copy / "values.schema.json").unlink()
    with (
        helm.Chart.load(copy) as unchecked,
        pytest.raises(helm.HelmRenderError, match=r"watchNamespaces\[1\] is .*quote it"),
    ):
        render(unchecked, {"watchNamespaces": ["payments", entry]})


# --- F3: what the router refuses fails the install ----------------------------------------------

REFUSED: dict[str, tuple[Doc, str]] = {
    "flag option typo": (
        {"sinks": {"flags": ["loki:http://loki.monitoring:3100?tennant=ops"]}},
        r'sinks.flags\[0\] \(loki sink\): option "tennant" is not one the loki sink takes',
    ),
    "flag level typo": (
        {"sinks": {"flags": ["stdout:?name=w&level=Warnin"]}},
        r'sinks.flags\[0\] \(stdout sink\): option "level" is "Warnin", must be',
    ),
    "flag bound": (
        {"sinks": {"flags": ["stdout:?name=w&batch_max_events=0"]}},
        r'option "batch_max_events" is "0", must be at least 1',
    ),
    "flag enum": (
        {"sinks": {"flags": ["stdout:?name=w&stream=STDERR"]}},
        r'option "stream" is "STDERR", must be one of stdout, stderr',
    ),
    "extraArgs sink option typo": (
        {"extraArgs": ["--sink", "kafka:k:9092?topic=t&name=k&acsk=all"]},
        r'extraArgs\[1\] \(kafka sink\): option "acsk" is not one',
    ),
    "flag name = config sink name": (
        {"sinks": {"flags": ["stdout:?level=Warning"]}},
        r'sinks.flags\[0\] \(sink "stdout"\): sink name "stdout" is already used by config.sinks\[0\]',
    ),
    "two config sinks one name": (
        {
            "config": {
                "sinks": [{"type": "stdout", "name": "a"}, {"type": "file", "name": "a", "url": "/tmp/x"}]
            }
        },
        r'config.sinks\[1\] \(sink "a"\): sink name "a" is already used by config.sinks\[0\]',
    ),
    "two flags of one type": (
        {"sinks": {"flags": ["file:/tmp/a", "file:/tmp/b"]}},
        r'sinks.flags\[1\] \(sink "file"\): sink name "file" is already used by sinks.flags\[0\]',
    ),
    "a flag in extraArgs of a config sink's name": (
        {"extraArgs": ["--sink=stdout:?name=stdout&level=Warning"]},
        r'extraArgs\[0\] \(sink "stdout"\): sink name "stdout" is already used by config.sinks\[0\]',
    ),
    "names stored as one": (
        {
            "sinks": {"flags": ["file:/tmp/a?name=es prod"]},
            "config": {"sinks": [{"type": "stdout", "name": "es_prod"}]},
        },
        r'sink names "es prod" and "es_prod" \(config.sinks\[0\]\) are both stored as "es_prod"',
    ),
    "config level typo": (
        {"config": {"sinks": [{"type": "stdout", "name": "s", "level": "Warnin"}]}},
        r"'/config/sinks/0/level': '.*' does not match pattern",
    ),
    "config batch_max_events 0": (
        {"config": {"sinks": [{"type": "stdout", "name": "s", "batch_max_events": 0}]}},
        r"'/config/sinks/0/batch_max_events': .*minimum",
    ),
    "config enum": (
        {"config": {"sinks": [{"type": "loki", "url": "http://l:3100", "format": "JSON"}]}},
        r"'/config/sinks/0/format'",
    ),
    # Item 290: a config sink's url names it as a flag's query does.
    "flag name = a config url's name": (
        {
            "config": {"sinks": [{"type": "file", "url": "/tmp/a.jsonl?name=x"}]},
            "sinks": {"flags": ["stdout:?name=x"]},
        },
        r'sinks.flags\[0\] \(sink "x"\): sink name "x" is already used by config.sinks\[0\]',
    ),
    "config enum as a list of two": (
        {"config": {"sinks": [{"type": "stdout", "stream": ["stderr", "stdout"]}]}},
        r"'/config/sinks/0/stream': maxItems: got 2, want 1",
    ),
    "config bound as a one-item list": (
        {"config": {"sinks": [{"type": "stdout", "batch_max_events": [0]}]}},
        r"'/config/sinks/0/batch_max_events/0': minimum: got 0, want 1",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_values_the_router_refuses_fail_the_install(chart: helm.Chart, case: str, tmp_path: Path) -> None:
    """Each rendered (schema and templates), `helm upgrade` replaced the working pod, and the new one
    exited 2 (review s34 F3). The router refuses each as well: the chart refuses no more than it."""
    values, message = REFUSED[case]
    with pytest.raises((helm.HelmValuesError, helm.HelmRenderError), match=message):
        render(chart, values)
    merged = yaml.safe_load((CHART / "values.yaml").read_text())["config"] | values.get("config", {})
    flags = [*values.get("sinks", {}).get("flags", []), *_extra_sinks(values.get("extraArgs", []))]
    with pytest.raises(ConfigError):
        build_specs(flags, merged["sinks"])


def _extra_sinks(args: list[str]) -> list[str]:
    return [
        a.split("=", 1)[1] if "=" in a else args[i + 1] for i, a in enumerate(args) if a.startswith("--sink")
    ]


def _config_rules() -> dict[str, dict[str, Doc]]:
    """Each built-in type → each key → the schema's rule for config.sinks ({} for none), a `$ref` to
    the config's definitions resolved."""
    config = json.loads((CHART / "values.schema.json").read_text())["properties"]["config"]

    def resolved(rule: Doc) -> Doc:
        prefix = "#/properties/config/definitions/"
        return config["definitions"][rule["$ref"].removeprefix(prefix)] if "$ref" in rule else rule

    return {
        t["if"]["properties"]["type"]["const"]: {k: resolved(v) for k, v in t["then"]["properties"].items()}
        for t in config["properties"]["sinks"]["items"]["allOf"]
    }


def _one_value(rule: Doc) -> Doc:
    """The rule of a value, out of its wrapping that also takes it as a one-item YAML list."""
    one: Doc = rule.get("else", rule)
    return one


def _sink_rules() -> dict[str, dict[str, Doc]]:
    return {t: {k: _one_value(v) for k, v in keys.items() if v} for t, keys in _config_rules().items()}


def _probes(rule: Doc) -> list[Any]:
    """Values around each enum, pattern and bound: in it, at it, beside it, in other cases and forms."""
    found: list[Any] = [None, "", "x"]
    for item in rule.get("enum", []):
        if isinstance(item, str):
            found += [item, item.upper(), item.lower(), item.capitalize(), item.swapcase()]
    # A pattern applies in the `else` of an `if` taking a text its error would quote (item 320).
    if "pattern" in rule.get("else", rule):
        found += ["Normal", "normal", "WARNING", "Warning", "Warnin"]
    for bound in (rule.get(k) for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")):
        if bound is not None:
            found += [bound, bound - 1, bound + 1, bound - 0.5, bound + 0.5, str(bound), str(bound - 1)]
    # A YAML list of one item is that item to the router (item 290), an empty or longer one refused.
    lists = [*([value] for value in found), [], [found[-1], found[-1]]]
    numbers = _number_texts(rule) if "number" in rule else []
    return [*found, *lists, *numbers, *([text] for text in numbers[-3:])]


def _number_texts(rule: Doc) -> list[Any]:
    """A number option's value in the forms the router's pydantic reads (item 303): text with white
    space around (Python's other spaces too), a sign, `_` between digits, `.0`, `5.`, `.5`, exponents,
    inf and nan, overflowing; YAML booleans; and near misses (`5s`, `1__0`, `0x10`)."""
    n = (
        int(rule["minimum"] if "minimum" in rule else rule.get("exclusiveMinimum", 0)) + 1500
    )  # within every bound but two
    return [
        *(True, False, "true", "5s", "1__0", "0x10", "٥", f"{n}", f" {n} ", f"\t{n}\u3000", f"+{n}"),
        *(f"0{n}", f"{n:_}", f"{n}.0", f"{n:_}.0", f"{n}.5", f"{n}.", f"{n / 1000}e3", ".5", "1_e3", "inf"),
        *("nan", "-1e400", "1e400", f"{n}.00", "1e3"),
    ]


PLUGINS = discover()  # once: build_specs discovers them at each call


def _router_takes(sink_type: str, key: str, value: Any) -> bool:
    """As `build_specs` takes one config.sinks entry."""
    try:
        build_spec({"type": sink_type, **BASE[sink_type], key: value}, where="probe", plugins=PLUGINS)
    except ConfigError:
        return False
    return True


def test_the_value_checks_refuse_nothing_the_router_takes(
    chart: helm.Chart, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every value around each generated enum, pattern and bound that the router takes passes the
    schema (config.sinks) and the template (a --sink flag's query): kafka's acks=ALL or -1, the file
    sink's file_mode 7777 (octal) are read by the sinks in their own way, and so have no rule. Each
    also as a one-item YAML list (`stream: [stderr]`), which the router reads as its item."""
    monkeypatch.setenv("ER_TEST_TOKEN", "t0ken")  # what the env: references of BASE read
    taken: list[Doc] = []
    flags: list[str] = []
    refused = 0
    for sink_type, rules in sorted(_sink_rules().items()):
        for key, rule in sorted(rules.items()):
            for value in _probes(rule):
                if not _router_takes(sink_type, key, value):
                    refused += 1
                    continue
                name = f"probe-{len(taken)}"
                taken.append({"type": sink_type, **BASE[sink_type], key: value, "name": name})
                as_text = "" if value is None else str(value)
                if isinstance(value, str | int | float) and _flag_takes(sink_type, key, as_text):
                    flags.append(sink_flag(sink_type, f"name=f{len(flags)}&{key}={as_text}"))
    assert refused and len(taken) > 500 and len(flags) > 500, (refused, len(taken), len(flags))
    chart.validate_schema(chart.merge_values({"config": {"sinks": taken}}))
    render(chart, {"config": {"sinks": []}, "sinks": {"flags": flags}})


def _flag_takes(sink_type: str, key: str, text: str) -> bool:
    """As `build_specs` takes one --sink flag."""
    try:
        build_spec(parse_sink_flag(sink_flag(sink_type, f"{key}={text}")), where="probe", plugins=PLUGINS)
    except ConfigError:
        return False
    return True


def test_the_flag_rules_are_the_schemas() -> None:
    """files/sink-options.json (the templates' flag check) holds the keys and rules the schema has for
    config.sinks, for each built-in type, the webhook's too (its unknown query keys stay in its URL,
    its options' values are judged: item 310)."""
    options = json.loads((CHART / "files" / "sink-options.json").read_text())
    by_type = _config_rules()
    assert set(options) == set(by_type)
    for sink_type, keys in options.items():
        assert keys == {k: _one_value(v) for k, v in by_type[sink_type].items() if k != "type"}, sink_type


# --- F2: turning leader election on ------------------------------------------------------------


def test_the_upgrade_turning_leader_election_on_recreates_the_pod(chart: helm.Chart, tmp_path: Path) -> None:
    installed = deployment(render(chart))
    assert "--leader-elect" not in installed["spec"]["template"]["spec"]["containers"][0]["args"]
    with helm.Chart.load(chart_with_live(tmp_path, installed)) as upgrading:
        for values in (
            {"leaderElection": {"enabled": True}},
            {"leaderElection": {"enabled": True}, "strategy": {"type": "RollingUpdate"}},
        ):
            assert deployment(render(upgrading, values))["spec"]["strategy"] == {"type": "Recreate"}, values
    # The next upgrade (the live pod has --leader-elect), and helm template (no live Deployment):
    elected = deployment(render(chart, {"leaderElection": {"enabled": True}}))
    rolling = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    assert elected["spec"]["strategy"] == rolling
    with helm.Chart.load(chart_with_live(tmp_path / "next", elected)) as again:
        assert deployment(render(again, {"leaderElection": {"enabled": True}}))["spec"]["strategy"] == rolling


def pod(docs: list[Doc], api: FakeApiServer, tmp: Path, name: str, data: Path | None = None) -> ChartPod:
    """One pod of a render as a process: an emptyDir of its own, or ``data`` (the claim)."""
    (cm,) = named(docs, "ConfigMap", FULLNAME)
    container = deployment(docs)["spec"]["template"]["spec"]["containers"][0]
    return ChartPod(cm["data"]["config.yaml"], container, api, tmp, name, NAMESPACE, data)


async def test_turning_leader_election_on_for_an_installed_release_delivers_nothing_twice(
    chart: helm.Chart, tmp_path: Path
) -> None:
    """Played as the Deployment controller rolls the rendered strategy out: RollingUpdate (before)
    started the new pod, which led, beside the old one, which had no Lease and kept delivering until
    the new one was Ready: what happened meanwhile reached every sink twice. Recreate stops the old
    pod (its drain and last checkpoint write) before the new one starts."""
    rev1 = render(chart)
    with helm.Chart.load(chart_with_live(tmp_path, deployment(rev1))) as upgrading:
        rev2 = render(upgrading, {"leaderElection": {"enabled": True}})
    recreate = deployment(rev2)["spec"]["strategy"]["type"] == "Recreate"
    async with FakeApiServer(token="t0ken") as api:
        api.bookmark_interval = 0.5
        for i in range(20):
            api.create_event(event_object(object_name=f"before-{i}"))
        old, new = pod(rev1, api, tmp_path, "old"), pod(rev2, api, tmp_path, "new")
        try:
            await old.start()
            await old.until_ready()
            await until(lambda: len(old.delivered()) >= 20, timeout=30)
            if recreate:
                assert await old.stop() == 0
            await new.start()
            await new.until_ready()
            for i in range(10):
                api.create_event(event_object(object_name=f"during-{i}"))
            await until(lambda: len(new.delivered()) >= 10, timeout=30)
            if not recreate:  # the old pod went once the new one was Ready; it had delivered these too
                await until(lambda: len(old.delivered()) >= 30, timeout=30)
                assert await old.stop() == 0
            assert await new.stop() == 0
        finally:
            old.kill()
            new.kill()
        want = {(e["metadata"]["uid"], occurrence_number(e)) for e in api.events()}
        got = collections.Counter(old.delivered()) + collections.Counter(new.delivered())
        assert set(got) >= want, "lost occurrences"
        twice = [k for k, n in got.items() if n > 1]
        assert twice == [], f"{len(twice)} delivered twice"


# --- F4: switching checkpoint.mode -------------------------------------------------------------


def test_notes_warn_when_an_upgrade_switches_the_checkpoint_mode(chart: helm.Chart, tmp_path: Path) -> None:
    to_data_dir = {"checkpoint": {"mode": "dataDir"}, "persistence": {"enabled": True}}
    configmap_mode = deployment(render(chart))
    data_dir_mode = deployment(render(chart, to_data_dir))
    with helm.Chart.load(chart_with_live(tmp_path / "a", configmap_mode)) as upgrading:
        said = " ".join(notes(upgrading, to_data_dir).split())
    assert (
        f"moved the checkpoint from ConfigMap {FULLNAME}-checkpoint (checkpoint.mode configMap) to the data dir"
        in said
    )
    # Item 286: the first start on the empty data dir takes the ConfigMap's checkpoint over.
    assert "takes that ConfigMap's checkpoint over (read only, --checkpoint-seed-configmap)" in said
    assert "delivers everything the API server still holds (up to an hour of events) again, once" not in said
    assert "is kept but no longer mounted" not in said
    with helm.Chart.load(chart_with_live(tmp_path / "b", data_dir_mode)) as upgrading:
        said = " ".join(notes(upgrading).split())
    assert "moved the checkpoint from the data dir (checkpoint.mode dataDir)" in said
    assert f"The claim {FULLNAME}-data is kept but no longer mounted" in said
    assert "eventrouter_sink_spool_depth is 0" in said
    # No switch (the same mode, or a first install): no warning; the general note is always there.
    with helm.Chart.load(chart_with_live(tmp_path / "c", configmap_mode)) as upgrading:
        said = " ".join(notes(upgrading).split())
    assert "WARNING" not in said
    assert (
        "Changing checkpoint.mode on this release later: configMap to dataDir takes the ConfigMap's" in said
    )
    assert "WARNING" not in notes(chart)


def test_values_and_readme_say_what_switching_the_checkpoint_mode_does() -> None:
    values = " ".join((CHART / "values.yaml").read_text().replace("#", " ").split())
    assert "Switching modes on an installed release: configMap -> dataDir delivers nothing twice" in values
    assert (
        "Any other switch starts without the old mode's checkpoint and delivers everything the API server"
        in values
    )
    readme = " ".join((CHART / "README.md").read_text().split())
    assert "### Switching checkpoint.mode" in (CHART / "README.md").read_text()
    assert "wait until `eventrouter_sink_spool_depth` is 0 for each, replay the dead letters" in readme
    assert (
        "scale to 0 first, `kubectl -n <namespace> scale deployment/<release>-eventrouter --replicas=0`"
        in readme
    )


# --- extraEnv: a proxy's password, and names that only look like credentials (review of item 271) ---


@pytest.mark.parametrize("name", ["HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "UPSTREAM"])
def test_an_extra_env_literal_with_a_urls_user_info_is_refused_whatever_its_name(
    chart: helm.Chart, name: str
) -> None:
    """The robots read HTTPS_PROXY (trust_env): `http://user:password@proxy` rendered into the pod
    spec, though the chart refuses a URL's user info in flags, config and extraArgs."""
    value = "http://proxyuser:S3cretProxyPw@proxy.corp:3128"
    with pytest.raises(
        helm.HelmRenderError, match=rf"extraEnv\[0\] \({name}\) holds a URL's user info"
    ) as refused:
        render(chart, {"extraEnv": [{"name": name, "value": value}]})
    assert "S3cretProxyPw" not in str(refused.value)
    plain = render(chart, {"extraEnv": [{"name": name, "value": "http://proxy.corp:3128"}]})
    env = deployment(plain)["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": name, "value": "http://proxy.corp:3128"} in env


def test_a_name_that_only_looks_like_a_credential_is_told_the_configmap_way(chart: helm.Chart) -> None:
    """`ROUTING_KEY` is refused by its name (…_KEY, documented); the message said only "a credential"
    and named Secrets as the way out: a value that is no secret can come from a ConfigMap."""
    with pytest.raises(helm.HelmRenderError, match=r"ROUTING_KEY.*valueFrom\.configMapKeyRef"):
        render(chart, {"extraEnv": [{"name": "ROUTING_KEY", "value": "events.k8s"}]})


# --- Item 290: values the router takes that item 280's checks refused ------------------------------


def _names_refused(run: Callable[..., object], *args: Any) -> bool:
    """Whether `run` is refused for two sinks of one name (or of names stored as one), by the router
    (ConfigError) or the chart (its template); any other refusal fails the test (`build_specs` checks
    the names after each sink: a case is about names only)."""
    try:
        run(*args)
    except (ConfigError, helm.HelmRenderError) as exc:
        if "is already used by" in str(exc) or "are both stored as" in str(exc):
            return True
        raise
    return False


URL_NAMED: dict[str, list[Doc]] = {
    "two loki sinks named in their urls": [
        {"type": "loki", "url": "http://loki-a:3100?name=loki-a"},
        {"type": "loki", "url": "http://loki-b:3100?name=loki-b&tenant=ops"},
    ],
    "two file sinks named in their urls beside stdout": [
        {"type": "stdout"},
        {"type": "file", "url": "/var/log/a.jsonl?name=audit"},
        {"type": "file", "url": "/var/log/b.jsonl?name=all"},
    ],
    # A + is a space to the router: the sink is "a b".
    "a + in a url's name": [
        {"type": "file", "url": "/var/log/a.jsonl?name=a+b"},
        {"type": "file", "url": "/var/log/b.jsonl"},
    ],
    # The router percent-decodes: its names are "q" and "file"; the chart cannot tell, and checks neither.
    "a percent-encoded name key": [
        {"type": "file", "url": "/var/log/a.jsonl?na%6De=q"},
        {"type": "file", "url": "/var/log/b.jsonl"},
    ],
}


@pytest.mark.parametrize("case", sorted(URL_NAMED))
def test_a_config_sink_named_in_its_url_query_is_not_refused(chart: helm.Chart, case: str) -> None:
    """The router takes a config.sinks entry's options from its url's query, its name too: item 280's
    check named each such entry after its type, and refused two of one type (review s34 r2chart F1)."""
    sinks = URL_NAMED[case]
    names = [spec.name for spec in build_specs([], sinks)]
    assert len(set(names)) == len(sinks), names
    render(chart, {"config": {"sinks": sinks}})


ONE_ITEM_LISTS: dict[str, tuple[Doc, bool]] = {
    "stream: [stderr]": ({"type": "stdout", "stream": ["stderr"]}, True),
    "format: [json]": ({"type": "loki", "url": "http://l:3100", "format": ["json"]}, True),
    "op_type: [create]": ({"type": "elasticsearch", "url": "http://e:9200", "op_type": ["create"]}, True),
    "level: [warning]": ({"type": "stdout", "level": ["warning"]}, True),
    "batch_max_events: [10]": ({"type": "stdout", "batch_max_events": [10]}, True),
    "stream: []": ({"type": "stdout", "stream": []}, False),
    "stream: [STDERR]": ({"type": "stdout", "stream": ["STDERR"]}, False),
    "stream: [stderr, stderr]": ({"type": "stdout", "stream": ["stderr", "stderr"]}, False),
    "level: [Warnin]": ({"type": "stdout", "level": ["Warnin"]}, False),
    "batch_max_events: [0]": ({"type": "stdout", "batch_max_events": [0]}, False),
}


@pytest.mark.parametrize("case", sorted(ONE_ITEM_LISTS))
def test_an_option_of_one_value_as_a_one_item_yaml_list_is_judged_as_its_item(
    chart: helm.Chart, case: str
) -> None:
    """The router reads `stream: [stderr]` as `stderr` and refuses an empty or longer list; item 280's
    enums refused the one-item list (review s34 r2chart F3), and its bounds and pattern took `[0]`."""
    entry, taken = ONE_ITEM_LISTS[case]
    try:
        build_specs([], [entry])
    except ConfigError:
        assert not taken
    else:
        assert taken
    values = chart.merge_values({"config": {"sinks": [entry]}})
    if taken:
        chart.validate_schema(values)
    else:
        with pytest.raises(helm.HelmValuesError, match=r"'/config/sinks/0/\w+"):
            chart.validate_schema(values)


def test_the_schema_takes_a_one_item_list_for_exactly_the_options_the_router_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each generated rule is wrapped to also take a one-item list where the router reads one as its
    item (options of one value), and only there."""
    monkeypatch.setenv("ER_TEST_TOKEN", "t0ken")  # what the env: references of BASE read
    for sink_type, rules in sorted(_config_rules().items()):
        for key, rule in sorted(rules.items()):
            if not rule:
                continue
            one = _one_value(rule)
            # 1 MiB: loki's per_stream_burst must hold its largest line (a check of the whole model).
            candidates = [v for v in [*_probes(one), 2**20] if not isinstance(v, list)]
            valid = next(v for v in candidates if _router_takes(sink_type, key, v))
            as_list = _router_takes(sink_type, key, [valid])
            assert (rule != one) == as_list, (sink_type, key)
            if as_list:
                then = {"minItems": 1, "maxItems": 1, "items": one}
                assert rule == {"if": {"type": "array"}, "then": then, "else": one}, (sink_type, key)


@pytest.mark.parametrize(
    "extra",
    [
        ["--config=/etc/own/config.yaml"],
        ["--config", "/etc/own/config.yaml"],
        ["--conf=/etc/own/config.yaml"],
        ["--confi", "/etc/own/config.yaml"],
    ],
    ids=["config=", "config-then-value", "conf=", "confi"],
)
def test_a_config_flag_in_extra_args_is_refused_as_the_router_refuses_a_second_one(
    chart: helm.Chart, extra: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """The chart gives the router --config (its ConfigMap): another in extraArgs made a pod that exits 2
    at start ("given more than once"), and item 280's name check blamed the chart's config.sinks
    beside it, which the router was thought not to read (review s34 r2chart F4)."""
    args = deployment(render(chart))["spec"]["template"]["spec"]["containers"][0]["args"]
    with pytest.raises(SystemExit) as exited:
        _parser().parse_args([*args, *extra])
    assert exited.value.code == 2
    assert "argument --config: given more than once" in capsys.readouterr().err
    values = {"extraArgs": extra, "sinks": {"flags": ["stdout:?level=Warning"]}}
    with pytest.raises(
        helm.HelmRenderError, match=r"extraArgs\[0\]: --config: the chart gives the router its own"
    ):
        render(chart, values)
    # An option that only begins alike is no --config.
    render(chart, {"extraArgs": ["--context=prod"]})


# Names that clash as they are or only in the data dir ("a b"/"a_b", "é"/"_"), and types as names.
_NAMES = ["a", "b", "a b", "a_b", "é", "_", "stdout", "file", "loki"]
_URLS = {"file": "/tmp/er-{i}.jsonl", "loki": "http://loki:3100", "webhook": "http://hook/{i}", "stdout": ""}


def _config_sink(rng: random.Random, i: int) -> Doc:
    """A config.sinks entry the router takes alone: named by its `name:`, its url's query or its type."""
    sink_type = rng.choice(sorted(_URLS))
    entry: Doc = {"type": sink_type}
    url = _URLS[sink_type].format(i=i)
    where = rng.choice(["name", "url", "none"] if url else ["name", "none"])
    name = rng.choice(_NAMES)
    if where == "url":
        url += "?name=" + name.replace(" ", rng.choice(["+", " "]))
    if url:
        entry["url"] = url
    if where == "name":
        entry["name"] = name
    return entry


def _random_flag(rng: random.Random, i: int) -> str:
    sink_type = rng.choice(sorted(_URLS))
    flag = f"{sink_type}:{_URLS[sink_type].format(i=100 + i)}"
    if rng.random() < 0.7:
        flag += "?name=" + rng.choice(_NAMES).replace(" ", rng.choice(["+", " "]))
    return flag


def _placed(rng: random.Random, flags: list[str]) -> Doc:
    """The flags as sinks.flags, or as --sink items of extraArgs in the forms argparse takes."""
    values: Doc = {"sinks": {"flags": []}, "extraArgs": []}
    for flag in flags:
        form = rng.choice(["flags", "--sink=", "--sink", "--si="])
        if form == "flags":
            values["sinks"]["flags"].append(flag)
        elif form == "--sink":
            values["extraArgs"] += ["--sink", flag]
        else:
            values["extraArgs"].append(form + flag)
    return values


def test_the_chart_refuses_two_sinks_of_one_name_exactly_when_the_router_does(chart: helm.Chart) -> None:
    """Random config.sinks (named by `name:`, by their url's query, or not) and --sink flags (in
    sinks.flags and extraArgs): the chart's name check refuses exactly what `build_specs` refuses."""
    rng = random.Random(290)
    verdicts: collections.Counter[tuple[bool, bool]] = collections.Counter()
    for case in range(150):
        sinks = [_config_sink(rng, i) for i in range(rng.randint(1, 3))]
        flags = [_random_flag(rng, i) for i in range(rng.randint(0, 3))]
        values = {"config": {"sinks": sinks}, **_placed(rng, flags)}
        router = _names_refused(build_specs, flags, sinks)
        chart_refuses = _names_refused(render, chart, values)
        assert chart_refuses == router, (case, values, router)
        verdicts[router, chart_refuses] += 1
    assert verdicts[True, True] > 30 and verdicts[False, False] > 30, verdicts


# --- item 286: the dataDir mode seeds from the configMap mode's checkpoint ---------------------


def test_the_data_dir_mode_seeds_from_the_configmap_modes_checkpoint_with_get_on_that_name_only(
    chart: helm.Chart,
) -> None:
    for values, name in (
        (TO_DATA_DIR, CHECKPOINT),
        ({**TO_DATA_DIR, "checkpoint": {"mode": "dataDir", "configMapName": "my-cp"}}, "my-cp"),
    ):
        docs = render(chart, values)
        assert f"--checkpoint-seed-configmap={name}" in args(docs)
        assert not [a for a in args(docs) if a.startswith("--checkpoint-configmap")]
        (role,) = named(docs, "Role", f"{FULLNAME}-checkpoint-seed")
        assert role["metadata"]["namespace"] == NAMESPACE
        assert role["rules"] == [
            {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [name], "verbs": ["get"]}
        ]
        (binding,) = named(docs, "RoleBinding", f"{FULLNAME}-checkpoint-seed")
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": f"{FULLNAME}-checkpoint-seed",
        }
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]
        # Not kept by helm uninstall: nothing reads it after the start.
        assert "annotations" not in role["metadata"]
    # The other modes neither seed nor grant it.
    for values in ({}, {"checkpoint": {"mode": "none"}}):
        docs = render(chart, values)
        assert not [a for a in args(docs) if a.startswith("--checkpoint-seed-configmap")]
        assert named(docs, "Role", f"{FULLNAME}-checkpoint-seed") == []
    # Without the chart's RBAC, NOTES says what to grant.
    unmanaged = render(chart, {**TO_DATA_DIR, "rbac": {"create": False}})
    assert named(unmanaged, "Role", f"{FULLNAME}-checkpoint-seed") == []
    said = notes(chart, {**TO_DATA_DIR, "rbac": {"create": False}})
    assert f"grant the service account get on ConfigMap {CHECKPOINT} in {NAMESPACE}" in said


def test_notes_say_the_switch_to_the_data_dir_takes_the_configmaps_checkpoint_over(
    chart: helm.Chart, tmp_path: Path
) -> None:
    with helm.Chart.load(chart_with_live(tmp_path / "a", deployment(render(chart)))) as upgrading:
        said = notes(upgrading, TO_DATA_DIR)
    assert (
        f"NOTE: this upgrade moved the checkpoint from ConfigMap {CHECKPOINT} (checkpoint.mode configMap) to the "
        "data dir. The new pod takes that ConfigMap's checkpoint over" in said
    )
    assert "nothing is delivered twice" in said
    assert "delivers everything the API server still holds (up to an hour of events) again, once" not in said
    # Back to configMap: still sent again, once (the data dir's claim is no longer mounted).
    with helm.Chart.load(
        chart_with_live(tmp_path / "b", deployment(render(chart, TO_DATA_DIR)))
    ) as upgrading:
        said = notes(upgrading)
    assert "WARNING: this upgrade moved the checkpoint from the data dir (checkpoint.mode dataDir)" in said
    assert "delivers everything the API server still holds (up to an hour of events) again, once" in said
    assert (
        "Changing checkpoint.mode on this release later: configMap to dataDir takes the ConfigMap's checkpoint "
        "over (nothing is delivered twice); any other switch sends everything the API server holds again, once"
        in notes(chart)
    )


def test_values_and_readme_say_which_switch_delivers_again() -> None:
    values = " ".join((CHART / "values.yaml").read_text().replace("#", " ").split())
    assert (
        "Switching modes on an installed release: configMap -> dataDir delivers nothing twice (the data dir "
        "takes the ConfigMap's checkpoint over, also a claim kept from an earlier dataDir period)" in values
    )
    assert "(configMapName; --checkpoint-seed-configmap, a Role grants get on that name only)" in values
    text = (CHART / "README.md").read_text()
    section = " ".join(
        text[text.index("### Switching checkpoint.mode") : text.index("## Uninstalling")].split()
    )
    assert "`configMap` → `dataDir` (with `persistence.enabled`): nothing is delivered twice." in section
    assert "`--checkpoint-seed-configmap=<release>-eventrouter-checkpoint`" in section
    assert (
        "`dataDir` → `configMap`: the router cannot take over the data dir's checkpoint (the claim is no longer mounted)"
        in section
    )
    assert "The router cannot take over the other mode's checkpoint" not in section


# ---- the upgrade, played -----------------------------------------------------------------------------


def configmap_verbs(api: FakeApiServer, since: int) -> set[tuple[str, str]]:
    """(verb, name) of each ConfigMap request after the first ``since`` requests, as RBAC sees it."""
    verbs = {"GET": "get", "PUT": "update", "POST": "create", "PATCH": "patch", "DELETE": "delete"}
    prefix = f"/api/v1/namespaces/{NAMESPACE}/configmaps"
    return {
        (verbs[r.method], r.path.removeprefix(prefix).strip("/"))
        for r in api.requests[since:]
        if r.path.startswith(prefix)
    }


async def test_the_upgrade_from_the_configmap_mode_to_the_data_dir_delivers_nothing_twice(
    chart: helm.Chart, tmp_path: Path
) -> None:
    """Revision 1 (the default, configMap) delivers and is stopped first (Recreate); revision 2 (dataDir on
    a new claim) started without a checkpoint and delivered all 20 again (item 281's Left). Now its
    first start takes the ConfigMap's checkpoint over, asking only what its Role grants."""
    rev1 = render(chart)
    with helm.Chart.load(chart_with_live(tmp_path, deployment(rev1))) as upgrading:
        rev2 = render(upgrading, TO_DATA_DIR)
    assert deployment(rev2)["spec"]["strategy"] == {"type": "Recreate"}
    async with FakeApiServer(token="t0ken") as api:
        api.bookmark_interval = 0.5
        for i in range(20):
            api.create_event(event_object(object_name=f"before-{i}"))
        old = pod(rev1, api, tmp_path, "old")
        new = pod(rev2, api, tmp_path, "new", data=tmp_path / "claim")
        try:
            await old.start()
            await old.until_ready()
            await until(lambda: len(old.delivered()) >= 20, timeout=30)
            assert await old.stop() == 0
            mark = len(api.requests)
            await new.start()
            await new.until_ready()
            for i in range(10):
                api.create_event(event_object(object_name=f"during-{i}"))
            await until(lambda: len(new.delivered()) >= 10, timeout=30)
            assert await new.stop() == 0
        finally:
            old.kill()
            new.kill()
        want = {(e["metadata"]["uid"], occurrence_number(e)) for e in api.events()}
        got = collections.Counter(old.delivered()) + collections.Counter(new.delivered())
        assert set(got) >= want, "lost occurrences"
        twice = [k for k, n in got.items() if n > 1]
        assert twice == [], f"{len(twice)} delivered twice"
        assert "checkpoint seeded from ConfigMap monitoring/er-eventrouter-checkpoint" in new.log.read_text()
        (role,) = named(rev2, "Role", f"{FULLNAME}-checkpoint-seed")
        used = configmap_verbs(api, mark)
        assert used == {("get", CHECKPOINT)}
        assert used <= granted(role)
