"""The chart faults of session 35's review (item 303): a credential typed `name:value` printed by a
refusal, numbers and repeated options the router refuses that rendered, a blank `flags:` and a type
alone refused, and upgrades that move the checkpoint ConfigMap without a word.

Rendered by Helm's own engine (helm-python). The `lookup` of the live workload is empty without a
cluster: a copy of the chart redefines the template that calls it, as tests/test_chart_s34.py does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import helm_python as helm
import pytest
import yaml
from chart_helpers import (
    BASE,
    CHART,
    FULLNAME,
    NAMESPACE,
    TOKEN_ENV,
    Doc,
    chart_with,
    deployment,
    notes,
    refusal,
    render,
    sink_flag,
)

from eventrouter.config import ConfigError, build_spec, build_specs, parse_sink_flag
from eventrouter.plugins import discover

SECRET = "Hunter2xyz"
PLUGINS = discover()  # once: build_specs discovers them at each call


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


@pytest.fixture(autouse=True)
def token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, "t0ken")  # what the env: references below read


def args(chart: helm.Chart, values: Doc) -> list[str]:
    return list(deployment(chart, values)["spec"]["template"]["spec"]["containers"][0]["args"])


def router_refusal(flags: list[str], sinks: list[Doc] | None = None) -> str:
    """The router's refusal of these sinks ("" when it takes them): each as `build_specs` judges it
    (whose plugin discovery at each call made these tests slow), then their names."""
    entries = sinks if sinks is not None else [{"type": "stdout", "name": "stdout"}]
    try:
        specs = [build_spec(e, where=f"config sinks[{i}]", plugins=PLUGINS) for i, e in enumerate(entries)]
        for i, flag in enumerate(flags, 1):
            entry = parse_sink_flag(flag, where=f"--sink #{i}")
            specs.append(build_spec(entry, where=f"--sink #{i}", plugins=PLUGINS))
        # A url's query (read by build_specs only) and two sinks of one name: its own judgement.
        if len({spec.name for spec in specs}) < len(specs) or any("?" in str(e.get("url")) for e in entries):
            build_specs(flags, entries)
    except ConfigError as exc:
        return str(exc)
    return ""


# --- F1: a credential typed name:value is never printed -----------------------------------------

TYPED: dict[str, Doc] = {
    "flag ?password:S": {
        "config": {"sinks": []},
        "sinks": {"flags": [f"loki:http://l:3100?username=er&password:{SECRET}"]},
    },
    "flag ?api_token:S": {"config": {"sinks": []}, "sinks": {"flags": [f"stdout:?api_token:{SECRET}"]}},
    "flag, a no-break space": {
        "config": {"sinks": []},
        "sinks": {"flags": [f"stdout:?password\u00a0{SECRET}"]},
    },
    "webhook flag": {"config": {"sinks": []}, "sinks": {"flags": [f"webhook:http://h/x?password:{SECRET}"]}},
    "extraArgs --sink=": {"extraArgs": [f"--sink=loki:http://l:3100?password:{SECRET}"]},
    "config url's query": {
        "config": {"sinks": [{"type": "loki", "url": f"http://l:3100?password:{SECRET}"}]}
    },
    "config {password:S}": {
        "config": {"sinks": [{"type": "loki", "url": "http://l:3100", f"password:{SECRET}": None}]}
    },
    "config {password S}": {"config": {"sinks": [{"type": "stdout", f"password {SECRET}": None}]}},
    "config {x:mytoken}": {"config": {"sinks": [{"type": "stdout", f"x:{SECRET}token": None}]}},
    "extraEnv {value:S}": {"extraEnv": [{"name": "LOKI_PASSWORD", f"value:{SECRET}": None}]},
    "a flag without its type's colon": {
        "config": {"sinks": []},
        "sinks": {"flags": [f"loki http://l?password={SECRET}"]},
    },
}


@pytest.mark.parametrize("case", sorted(TYPED))
def test_a_credential_typed_name_colon_value_is_never_printed(chart: helm.Chart, case: str) -> None:
    """`?password:S3cret` (no `=`) or a YAML flow `{password:S3cret}` (no space) makes a key named
    `password:S3cret`: the flag key check and the schema's additional-properties error printed it whole
    into `helm upgrade`'s output, CI logs and Argo CD; the router shows `'password:…'` only. An
    extraEnv `{name: X, value:S3cret}` rendered the key into the pod spec."""
    values = TYPED[case]
    said = refusal(chart, values)
    assert said, "rendered"
    assert SECRET not in said, said
    flags = [
        *values.get("sinks", {}).get("flags", []),
        *(a.removeprefix("--sink=") for a in values.get("extraArgs", [])),
    ]
    if "extraEnv" not in values:  # the router refuses each sink too, unprinted
        by_router = router_refusal(flags, values.get("config", {}).get("sinks"))
        assert by_router and SECRET not in by_router
    if "password:" in case or "api_token" in case:
        assert re.search(r'"(password|api_token):…" \(the rest not shown: did you mean \w+=…\?\)', said), said


# --- F3: numbers the router cannot read, and an option of one value given twice -------------------

NUMBER_TEXTS = [
    "5s",
    "",
    "1e3",
    " 5",
    "5.0",
    "1_000",
    "true",
    "0",
    "5.5",
    "+5",
    ".5",
    "inf",
    "nan",
    "1__0",
    "1e400",
]


def _number_rules() -> dict[tuple[str, str], Doc]:
    """(type, key) → the rule of each number option of the flag check (the schema's for config.sinks)."""
    options = json.loads((CHART / "files" / "sink-options.json").read_text())
    return {(t, k): r for t, keys in options.items() for k, r in keys.items() if "number" in r}


def _refused_for_itself(error: str, key: str) -> bool:
    """The router refused the option's own value (not another's, not a check of several options)."""
    return f"option {key!r}:" in error


def test_a_number_the_router_cannot_read_is_refused_by_the_chart_and_no_other(chart: helm.Chart) -> None:
    """`batch_max_wait=5s`, `batch_max_events=` (a blank --set), `1e3` for an integer, `send_timeout:
    "10s"` in config.sinks rendered, and the router exited 2 ("Input should be a valid number"): item
    280 judged bounds on plain numbers only. For each number option and each text, as a flag's value
    and as a config.sinks string, the chart refuses when the router refuses that option's value, and
    never what the router takes."""
    verdicts: dict[tuple[str, str, str], str] = {}  # (rule, form, text) → the chart's refusal
    compared = refused = 0
    for (sink_type, key), rule in sorted(_number_rules().items()):
        for text in NUMBER_TEXTS:
            for form in ("flag", "config"):
                if form == "flag":
                    flag = sink_flag(sink_type, f"name=p&{key}={text}")
                    by_router = router_refusal([flag], [])
                    values: Doc = {"config": {"sinks": []}, "sinks": {"flags": [flag]}}
                else:
                    entry = {"type": sink_type, **BASE[sink_type], "name": "p", key: text}
                    by_router = router_refusal([], [entry])
                    values = {"config": {"sinks": [entry]}}
                # The chart's verdict depends on the rule only: rendered once a rule.
                memo = (json.dumps(rule, sort_keys=True), form, text)
                if memo not in verdicts:
                    verdicts[memo] = refusal(chart, values)
                    assert not verdicts[memo] or f'option "{key}" is "{text}", must be' in verdicts[memo]
                by_chart = verdicts[memo]
                where = (sink_type, key, form, text, by_chart[-200:], by_router[:200])
                if by_chart:
                    assert by_router, where  # never refuses what the router takes
                    refused += 1
                elif _refused_for_itself(by_router, key):
                    raise AssertionError(("rendered what the router refuses", *where))
                compared += 1
    assert compared > 1500 and refused > 500, (compared, refused)


def test_the_chart_reads_a_number_as_the_router_does_in_every_form(chart: helm.Chart) -> None:
    """The forms pydantic's lax mode reads (white space around it, `+`, `_` between digits, `.0` for an
    integer; `5.`, `.5`, exponents for a float) render; its near misses are refused, naming the option
    and what it must be."""
    ints = {" 5 ": True, "\t5\u3000": True, "+5": True, "0_5": True, "5.00": True, "1_000.0": True}
    ints |= {"5.": False, "5.0_0": False, "1__0": False, "_5": False, "5e0": False, "0x10": False, "٥": False}
    floats = {"5.": True, ".5": True, "1e-3": True, "1_e3": True, "._5": True, " 1e3 ": True, "1E3": True}
    floats |= {"_.5": False, "1e": False, "1__0": False, " 4_4": False, "5,5": False, "0x1p3": False}
    for key, cases in (("batch_max_events", ints), ("batch_max_wait", floats)):
        for text, taken in cases.items():
            flag = f"stdout:?name=p&{key}={text}"
            assert (router_refusal([flag], []) == "") == taken, (key, text)
            said = refusal(chart, {"config": {"sinks": []}, "sinks": {"flags": [flag]}})
            assert (said == "") == taken, (key, text, said)
    # Every float option refuses inf and nan (allow_inf_nan=False, or its bounds).
    said = refusal(chart, {"sinks": {"flags": ["stdout:?name=p&send_timeout=inf"]}})
    assert "must be a finite number" in said


def test_an_option_of_one_value_given_twice_in_a_flag_is_refused_as_the_router_does(
    chart: helm.Chart,
) -> None:
    """`stream=stderr&stream=stdout` and `level=Warning&level=Normal` rendered; the router refuses an
    option of one value given twice ("given 2 times … takes one value"). Every key of every built-in
    type (the webhook's too) given twice, with a value it takes once: refused exactly when the router
    refuses it for that."""
    one_value: dict[str, list[str]] = json.loads((CHART / "files" / "one-value-options.json").read_text())
    options: dict[str, Doc] = json.loads((CHART / "files" / "sink-options.json").read_text())
    both = twice_only_router = 0
    common = set(options["stdout"]) | set(one_value["stdout"])  # the filter and pipeline options
    for sink_type in sorted(one_value):
        keys = set(options.get(sink_type, {})) | set(one_value[sink_type])
        for key in sorted(keys if sink_type == "stdout" else keys - common):
            if key in BASE[sink_type] or key == "url":
                continue
            value = _a_value(key, options.get(sink_type, {}).get(key, {}))
            once = sink_flag(sink_type, f"{key}={value}")
            if router_refusal([once], []):
                continue  # a value this key does not take alone: not about giving it twice
            twice = sink_flag(sink_type, f"{key}={value}&{key}={value}")
            by_router = "given 2 times" in router_refusal([twice], [])
            said = refusal(chart, {"config": {"sinks": []}, "sinks": {"flags": [twice]}})
            assert by_router == (key in one_value[sink_type]), (sink_type, key)
            assert (said != "") == by_router, (sink_type, key, said)
            if by_router:
                assert f'option "{key}" is given twice, but takes one value' in said
                both += 1
            else:
                twice_only_router += 1
    assert both > 60 and twice_only_router > 20, (both, twice_only_router)


def _a_value(key: str, rule: Doc) -> str:
    """A value an option takes alone, for most of them."""
    if "enum" in rule:
        return str(next(v for v in rule["enum"] if v is not None))
    if "number" in rule:
        return str(int(rule["minimum"] if "minimum" in rule else rule.get("exclusiveMinimum", 0)) + 1)
    if "pattern" in rule.get("else", rule):  # in the `else` of an `if` (item 320)
        return "Warning"
    credential = re.search(r"(?i)(password|token|secret|key|sign|header|proxy)", key)
    return f"env:{TOKEN_ENV}" if credential else "x"


# --- F4: a blank flags key, a type alone -----------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [{"sinks": {"flags": None}}, {"sinks": None}, {"sinks": {"flags": ["stdout"]}, "config": {"sinks": []}}],
    ids=["flags-blank", "sinks-blank", "type-only"],
)
def test_a_blank_flags_key_and_a_type_only_flag_render(chart: helm.Chart, values: Doc) -> None:
    """A values file whose `flags:` (or `sinks:`) is left blank, its items commented out (YAML null:
    Helm drops the default) failed every install in NOTES ("len of nil pointer"); `stdout` alone, the
    router's `--sink=stdout`, failed the schema's pattern. Both render, and the pod's args are what
    the router takes."""
    rendered = args(chart, values)
    flags = [a.removeprefix("--sink=") for a in rendered if a.startswith("--sink=")]
    config = yaml.safe_load(
        yaml.safe_load(render(chart, values)[f"{CHART.name}/templates/configmap.yaml"])["data"]["config.yaml"]
    )
    names = [spec.name for spec in build_specs(flags, config["sinks"] or [])]
    assert names == ["stdout"]
    assert "Sinks: " in notes(chart, values)


def test_a_flag_whose_type_is_no_type_is_refused_without_quoting_it(chart: helm.Chart) -> None:
    """The schema's pattern printed the whole flag (`'<flag>' does not match pattern`); the templates
    refuse a type that is no type name without quoting any of it. A plain name other than `stdout` is
    refused by the schema (no URL: the router has no such type, or it needs one)."""
    for flag in (f"loki http://l?password={SECRET}", f"dingtalk?access_token={SECRET}", " :x"):
        said = refusal(chart, {"sinks": {"flags": [flag]}})
        assert "a sink flag is TYPE or TYPE:URL?options" in said and SECRET not in said, said
        assert router_refusal([flag])
    assert "'/sinks/flags/0'" in refusal(chart, {"sinks": {"flags": ["loki"]}})
    assert router_refusal(["loki"])
    render(chart, {"sinks": {"flags": [" stdout:?name=s"]}})  # the router strips the type


# --- F2: an upgrade that moves the checkpoint ConfigMap ---------------------------------------------


def test_notes_warn_when_an_upgrade_renames_the_checkpoint_configmap(
    chart: helm.Chart, tmp_path: Path
) -> None:
    """`checkpoint.configMapName` (or `fullnameOverride`/`nameOverride`, which name it by default)
    changed on an installed release: the new pod starts on a ConfigMap that does not exist and delivers
    everything the API server still holds again (review: 20 of 30 twice); NOTES said nothing."""
    live = deployment(chart, {})
    with helm.Chart.load(
        chart_with(tmp_path / "a", "eventrouter.liveWorkload", yaml.safe_dump(live))
    ) as upgrading:
        renamed = notes(upgrading, {"checkpoint": {"configMapName": "er-events-checkpoint"}})
        overridden = notes(upgrading, {"fullnameOverride": "events"})
        seeded_elsewhere = notes(
            upgrading,
            {"checkpoint": {"mode": "dataDir", "configMapName": "other"}, "persistence": {"enabled": True}},
        )
        same = notes(upgrading, {"checkpoint": {"configMapName": f"{FULLNAME}-checkpoint"}})
        seeded = notes(upgrading, {"checkpoint": {"mode": "dataDir"}, "persistence": {"enabled": True}})
    assert (
        f"WARNING: this upgrade moved the checkpoint from ConfigMap {FULLNAME}-checkpoint to ConfigMap "
        "er-events-checkpoint (checkpoint.configMapName, or fullnameOverride/nameOverride" in renamed
    )
    assert "delivers everything the API server still holds (up to an hour of events) again, once" in renamed
    assert f"kubectl -n {NAMESPACE} delete configmap {FULLNAME}-checkpoint" in renamed
    assert f"from ConfigMap {FULLNAME}-checkpoint to ConfigMap events-checkpoint" in overridden
    assert (
        f"from ConfigMap {FULLNAME}-checkpoint to the data dir, seeded from ConfigMap other"
        in seeded_elsewhere
    )
    for unchanged in (same, seeded):
        assert "WARNING:" not in unchanged
    assert "nothing is delivered twice" in seeded  # item 286's seed, under the same name


def test_the_release_router_is_found_under_its_former_name(chart: helm.Chart, tmp_path: Path) -> None:
    """A new fullname: `lookup` by the new name finds nothing, so item 281's checks (the mode switch,
    leader election turned on) saw a first install. The release's router is now found by its labels
    among the namespace's workloads (another release's is not), and NOTES says the former one is
    deleted while the new one starts."""
    ours = deployment(chart, {})
    other = deployment(chart, {"fullnameOverride": "other-router"})
    other["metadata"]["labels"]["app.kubernetes.io/instance"] = "other"
    for live in (ours, other):
        live["metadata"]["annotations"] = {
            "meta.helm.sh/release-name": live["metadata"]["labels"]["app.kubernetes.io/instance"]
        }
    listed = yaml.safe_dump({"items": [other, ours]})
    with helm.Chart.load(chart_with(tmp_path, "eventrouter.releaseWorkloads", listed)) as upgrading:
        said = notes(upgrading, {"fullnameOverride": "events"})
        elected = deployment(upgrading, {"fullnameOverride": "events", "leaderElection": {"enabled": True}})
        unchanged = notes(upgrading, {})
    assert (
        f"WARNING: this upgrade renamed the release's router from deployment/{FULLNAME} to deployment/events"
        in said
    )
    assert "both delivered until its pod stopped" in said
    assert f"from ConfigMap {FULLNAME}-checkpoint to ConfigMap events-checkpoint" in said
    assert elected["spec"]["strategy"] == {"type": "Recreate"}  # item 281: the live router has no Lease
    assert "WARNING:" not in unchanged  # found by name: the same router


# --- D1, D3: what the README and values.yaml say ----------------------------------------------------


def test_the_readme_and_values_state_the_refusal_rules_as_the_templates_apply_them() -> None:
    readme = " ".join((CHART / "README.md").read_text().split())
    assert "a `config.sinks` entry's `name`, else the `name=` in its `url`'s query, else its type" in readme
    values = " ".join((CHART / "values.yaml").read_text().replace("#", " ").split())
    assert "any literal value holding a URL's user info (HTTPS_PROXY=http://user:pass@proxy)" in values
    assert "or the word KEY or PASS (DB_PASS, SecretKey; MONKEY renders)" in values
    assert (
        "changing this, fullnameOverride or nameOverride on an installed release starts the router" in values
    )
