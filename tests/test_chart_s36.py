"""The chart's refusals that still printed a secret (session 36, the Left of items 303, 310 and 314): the
schema's patterns (`leaseName: http://admin:S3cret@host` was quoted whole), the keys of its other
objects and of its maps of Kubernetes keys (the error's path or "additional properties" named a key
typed `name:value`), a plugin sink's key typed `name:value` (rendered into the ConfigMap and the pod
spec: the check was a built-in type's only), and a config.sinks `level:` holding a credential-shaped
value (the schema's pattern quoted it).

Rendered by Helm's own engine (helm-python), as tests/test_chart_s35c.py does.

A config sink's `name:` (and a flag's `name=`) printed by the chart's refusals (session 36, review-b
F2 of item 314): every refusal of a config.sinks entry named it `config.sinks[i] (<name>)`, so a name
holding a URL's user info was printed whole by the very refusal of that user info, and a name holding
any other secret by each refusal of its entry. The router takes such a name and prints it in its logs
and metric labels.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import helm_python as helm
import pytest
import yaml
from chart_helpers import CHART, Doc, docs, refusal, render, router_refusal

from eventrouter.config import ConfigError, build_specs

SECRET = "S3cretXYZ"
KEY30 = "LTAI5tAbCdEfGhIjKlMnOpQrStUvWx"  # an SLS AccessKeySecret's shape: 30 letters and digits


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def nested(path: str, value: Any) -> Doc:
    """{"a": {"b": value}} for "a.b"."""
    for part in reversed(path.split(".")):
        value = {part: value}
    assert isinstance(value, dict)
    return value


def merged(*parts: Doc) -> Doc:
    out: Doc = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merged(out[key], value)
            else:
                out[key] = value
    return out


def schema() -> Doc:
    found: Doc = json.loads((CHART / "values.schema.json").read_text())
    return found


# --- the schema's patterns ---------------------------------------------------------------------

URL = f"http://admin:{SECRET}@host"
# Each value with a pattern (outside config, whose sinks are the next section's): a credential-shaped
# value it refuses, a short typo the schema still shows, a value it takes, and what else the values need.
PATTERNS: dict[str, tuple[Any, str, Any, Doc]] = {
    "image.digest": (f"sha256:{SECRET}", "sha256", "sha256:" + "a" * 64, {}),
    "watchNamespaces": ([URL], "Payments", ["payments", "kube-system"], {}),
    "sinks.flags": (
        [f"{SECRET}0123456789"],
        "loki",
        ["stdout", "loki:http://loki:3100"],
        {"config": {"sinks": []}},
    ),
    "credentials.mountPath": (URL, "creds", "/etc/creds", {"credentials": {"values": {"k": "v"}}}),
    "checkpoint.dataDir": (URL, "data", "/var/lib/er", {"checkpoint": {"mode": "dataDir"}}),
    "checkpoint.configMapName": (f"cp:{SECRET}", "My_Cp", "er.cp-1", {}),
    "leaderElection.leaseName": (URL, "My_Lease", "er-lease.a", {}),
    "metrics.serviceMonitor.interval": (
        KEY30,
        "30 s",
        "30s",
        {"metrics": {"serviceMonitor": {"enabled": True}}},
    ),
    "metrics.serviceMonitor.scrapeTimeout": (
        URL,
        "10sec",
        "500ms",
        {"metrics": {"serviceMonitor": {"enabled": True}}},
    ),
    "podDisruptionBudget.minAvailable": (
        f"{SECRET}0123456789",
        "50",
        "50%",
        {"podDisruptionBudget": {"enabled": True}},
    ),
    "podDisruptionBudget.maxUnavailable": (URL, "one", "25%", {"podDisruptionBudget": {"enabled": True}}),
}


def _pattern_places(node: Any, path: list[str]) -> Iterator[tuple[str, Doc]]:
    """(value path, the schema node) of each object holding a pattern, outside config."""
    if isinstance(node, list):
        for item in node:
            yield from _pattern_places(item, path)
    elif isinstance(node, dict):
        if path == ["config"]:
            return
        if "pattern" in node.get("else", {}):
            yield ".".join(path), node
        for key, value in node.items():
            if key == "properties":
                for name, prop in value.items():
                    yield from _pattern_places(prop, [*path, name])
            elif key in ("items", "oneOf", "anyOf", "allOf"):
                yield from _pattern_places(value, path)


def test_no_pattern_of_the_schema_applies_to_a_text_its_error_would_quote() -> None:
    """Helm's error for a pattern quotes the text it refuses (`'http://admin:S3cret@host' does not match
    pattern`). Each pattern is the `else` of an `if` that takes a text that is no short name: that text
    is the templates' to refuse. And every such value is one the tests below refuse unshown."""
    places = dict(_pattern_places(schema(), []))
    text = json.dumps(schema()["properties"] | {"config": None})
    assert text.count('"pattern"') == 2 * len(places), "a pattern outside an if/else"
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    level = schema()["properties"]["config"]["definitions"]["pattern-_i_normal_warning_-if-shown"]["else"]
    for where, node in places.items():
        assert node["if"]["type"] == "string" and "pattern" in node["if"]["not"], where
        if where != "sinks.flags":  # one rule of a text shown, config.sinks' level's (scripts/gen_docs.py)
            assert node["if"] == level["if"], where
        assert f"`{node['else']['pattern']}`" in helpers, where  # the templates' check is the schema's
    assert set(places) == set(PATTERNS)


@pytest.mark.parametrize("where", sorted(PATTERNS))
def test_a_value_a_pattern_refuses_is_refused_unshown(chart: helm.Chart, where: str) -> None:
    """`leaderElection.leaseName: http://admin:S3cret@host` (a URL pasted in the wrong key) was quoted
    whole by the schema's pattern into `helm upgrade`'s output, CI logs and Argo CD. Refused naming the
    value and what it must be, not showing it; a short typo is still shown by the schema, and a value
    the pattern takes renders."""
    value, typo, good, needs = PATTERNS[where]
    said = refusal(chart, merged(needs, nested(where, value)))
    assert said, "rendered"
    assert SECRET not in said and KEY30 not in said and "admin" not in said, said
    shown_where = f"{where}[0]" if isinstance(value, list) else where
    assert f"{shown_where} is not " in said and "the value is not shown" in said, said
    typo_value = [typo] if isinstance(value, list) else typo
    assert f"'{typo}' does not match pattern" in refusal(chart, merged(needs, nested(where, typo_value)))
    render(chart, merged(needs, nested(where, good)))


# --- a key typed name:value in the chart's objects and maps -----------------------------------------

# Each object of the chart's values (a key not one of its own) and each map of Kubernetes keys (a
# key Kubernetes does not take), with a key that renders there.
OBJECTS = [
    "image",
    "sinks",
    "checkpoint",
    "persistence",
    "leaderElection",
    "serviceAccount",
    "rbac",
    "metrics",
    "metrics.service",
    "metrics.serviceMonitor",
    "podDisruptionBudget",
    "grafanaDashboard",
    "resources",
    "strategy",
]
MAPS = {
    "podAnnotations": "vault.hashicorp.com/role",
    "podLabels": "team",
    "nodeSelector": "kubernetes.io/os",
    "persistence.annotations": "example.com/backup",
    "serviceAccount.annotations": "eks.amazonaws.com/role-arn",
    "metrics.service.annotations": "prometheus.io/scrape",
    "metrics.serviceMonitor.labels": "release",
    "grafanaDashboard.labels": "grafana_dashboard",
    "grafanaDashboard.annotations": "folder",
    "resources.requests": "cpu",
    "resources.limits": "nvidia.com/gpu",
}


def _keyed_places(node: Any, path: list[str]) -> Iterator[str]:
    """The value path of each object the schema closes or whose keys it types (additionalProperties)."""
    if not isinstance(node, dict):
        return
    if "additionalProperties" in node and path:
        yield ".".join(path)
    for name, prop in node.get("properties", {}).items():
        yield from _keyed_places(prop, [*path, name])


def test_every_object_lets_a_key_no_key_of_it_is_through_to_the_templates() -> None:
    """`additional properties 'leaseName:S3cret' not allowed` and `at '/podAnnotations/x:S3cret': got null,
    want string` printed the key: each object of the schema lets a key holding a character none of its
    keys holds through (patternProperties), for the templates to refuse unshown."""
    places = set(_keyed_places(schema(), []))
    handled = {"config", "credentials", "credentials.values"}  # items 303 and 310
    assert places - handled == set(OBJECTS) | set(MAPS)
    for place in places:
        node = schema()
        for part in place.split("."):
            node = node["properties"][part]
        assert node["patternProperties"], place


@pytest.mark.parametrize("where", [*OBJECTS, *MAPS])
def test_a_key_typed_name_colon_value_is_refused_unshown(chart: helm.Chart, where: str) -> None:
    """A YAML flow without a space (`leaderElection: {leaseName:S3cret}`, `podAnnotations:
    {vault.hashicorp.com/token:S3cret}`) is one key holding the value: the schema's error printed it,
    and in a map of strings it rendered into the pod spec. Refused naming the part before the ':'."""
    head = MAPS.get(where, "name")
    for value in (None, "x", 5):
        said = refusal(chart, nested(where, {f"{head}:{SECRET}": value}))
        assert said, (value, "rendered")
        assert SECRET not in said, said
        assert f'{where}: key "{head}:…" (the rest not shown' in said, said
    assert SECRET not in refusal(chart, nested(where, {f"{head} {SECRET}": "x"}))
    if where in MAPS:  # a key Kubernetes takes renders
        render(chart, nested(where, {head: "1"}))


# --- F6: a plugin sink's key typed name:value ---------------------------------------------------

PLUGIN_PLACES: dict[str, Doc] = {
    "config.sinks key": {
        "config": {"sinks": [{"type": "splunk_hec", "url": "https://h", f"token:{SECRET}": "x"}]}
    },
    "config.sinks key, null": {"config": {"sinks": [{"type": "splunk_hec", f"token:{SECRET}": None}]}},
    "config url query": {
        "config": {"sinks": [{"type": "splunk_hec", "url": f"https://h/x?a=1&token:{SECRET}"}]}
    },
    "flag query": {"sinks": {"flags": [f"splunk_hec:https://h/x?token:{SECRET}=1"]}},
    "flag query, a space": {"sinks": {"flags": [f"splunk_hec:https://h/x?index=i&token {SECRET}"]}},
    "extraArgs --sink": {"extraArgs": ["--sink", f"splunk_hec:https://h/x?token:{SECRET}"]},
}


@pytest.mark.parametrize("place", sorted(PLUGIN_PLACES))
def test_a_plugin_sinks_key_typed_name_colon_value_is_refused_unshown(chart: helm.Chart, place: str) -> None:
    """The name:value key checks were a built-in type's only: `{type: splunk_hec, token:S3cret: x}`
    (or `?token:S3cret` in a plugin's flag) rendered the secret into the ConfigMap and the pod spec.
    Refused for every type, naming the key's part before the ':'."""
    values = merged({"config": {"sinks": [{"type": "stdout"}]}}, PLUGIN_PLACES[place])
    said = refusal(chart, values)
    assert said, "rendered"
    assert SECRET not in said, said
    assert '"token:…" (the rest not shown' in said or '"token …" (the rest not shown' in said, said
    assert "splunk_hec" in said, said
    # A plugin's own keys render, in the ConfigMap's config and sink flags as written.
    sinks = [
        {
            "type": "splunk_hec",
            "url": "https://h/x?index=i&source=er",
            "token": "env:HEC_TOKEN",
            "my-opt.x": 1,
        }
    ]
    flags = ["splunk_hec:https://h/y?index=i&name=hec2&time=12:30"]
    rendered = docs(render(chart, {"config": {"sinks": sinks}, "sinks": {"flags": flags}}))
    config = next(d for d in rendered if d["kind"] == "ConfigMap" and "config.yaml" in d["data"])
    assert yaml.safe_load(config["data"]["config.yaml"])["sinks"] == sinks
    assert config["data"]["sink-flags"].split("\n") == flags


# --- a config.sinks level holding a credential-shaped value --------------------------------------

LEVELS = {
    "the rest of a query": f"Warning&password={SECRET}",
    "a key pasted there": KEY30,
    "as a one-item list": [f"Warning;token={SECRET}"],
}


@pytest.mark.parametrize("case", sorted(LEVELS))
def test_a_config_level_holding_a_credential_shaped_value_is_refused_unshown(
    chart: helm.Chart, case: str
) -> None:
    """`level: Warning&password=S3cret` (a flag's query ported whole into one option) was quoted by the
    schema's pattern (`'Warning&password=S3cret' does not match pattern`). The schema applies the
    pattern to a short name only; the templates refuse another, not shown, as they do in a flag."""
    for sink in ({"type": "stdout"}, {"type": "webhook", "url": "http://h/x"}):
        entry = {**sink, "level": LEVELS[case]}
        said = refusal(chart, {"config": {"sinks": [entry]}})
        assert 'option "level" has a value not shown' in said, said
        assert SECRET not in said and KEY30 not in said, said
        assert router_refusal([], [entry])  # the router refuses it too (exit 2)
    # What the router takes renders; a typo is still shown, by the schema and in a flag.
    taken: list[Any] = ["Normal", "normal", "WARNING", "Warning", ["warning"], None]
    for level in taken:
        entry = {"type": "stdout", "level": level}
        assert router_refusal([], [entry]) == ""
        render(chart, {"config": {"sinks": [entry]}})
    for level in ("Warnin", ["Warnin"]):
        said = refusal(chart, {"config": {"sinks": [{"type": "stdout", "level": level}]}})
        assert "'Warnin' does not match pattern" in said, said
    # A flag's level is judged by the same rule (files/sink-options.json), a typo still shown.
    said = refusal(chart, {"sinks": {"flags": ["stdout:?name=w&level=Warnin"]}})
    assert 'option "level" is "Warnin"' in said, said
    said = refusal(chart, {"sinks": {"flags": [f"stdout:?name=w&level={KEY30}"]}})
    assert 'option "level" has a value not shown' in said and KEY30 not in said, said


# Names the router takes (it would print them in its logs and metric labels) that may hold a secret.
SHAPED = {"url": f"http://admin:{SECRET}@x", "name-colon-value": f"token:{SECRET}"}  # refused as such
LONG_TOKEN = f"a1B2c3D4{SECRET}e5F6g7H8"  # a name's characters, but a token's length and shape
LOKI = {"type": "loki", "url": "http://loki:3100"}

# Refusals of one config.sinks entry other than its name's: what to add to the entry (or the values).
FAULTS: dict[str, Doc] = {
    "number as text": {"batch_max_wait": "5s"},
    "credential literal": {"password": "hunter2"},
    "user info in url": {"url": "http://u:p4ss@loki:3100"},
    "key typed name:value": {"tenant:abc": None},
    "type in another case": {"type": "Loki"},
    "credential in a url query": {"url": "http://loki:3100?password=hunter2"},
}


def router_takes(flags: list[str], sinks: list[Doc]) -> bool:
    try:
        build_specs(flags, sinks)
    except ConfigError:
        return False
    return True


@pytest.mark.parametrize("shape", sorted(SHAPED))
def test_a_name_shaped_as_a_credential_is_refused_unshown_by_every_refusal_of_its_entry(
    chart: helm.Chart, shape: str
) -> None:
    """`name: loki:http://admin:S3cret@loki:3100` (a flag ported whole) was refused for its user info
    with the password in the same message; `name: token:S3cret` rendered, and each other refusal of
    the entry printed it. Such a name is refused first, naming the entry by its type, and whatever
    else is wrong with the entry the secret is not shown; in a flag's (or a config url's) `name=` too,
    percent-encoded as well."""
    name = SHAPED[shape]
    # The router refuses it at start since item 339 (exit 2, a crash-looping pod): the chart must too.
    assert not router_takes([], [{"type": "stdout", "name": name}])
    for fault, extra in {"none": {}, **FAULTS}.items():
        said = refusal(chart, {"config": {"sinks": [{**LOKI, "name": name, **extra}]}})
        assert said and SECRET not in said and "admin" not in said, (fault, said)
        assert 'option "name" holds a' in said and "name not shown" in said, (fault, said)
    said = refusal(chart, {"config": {"sinks": [{**LOKI, "name": name}, {**LOKI, "name": name}]}})
    assert said and SECRET not in said, said
    encoded = name.replace(":", "%3A").replace("@", "%40")
    for values in (
        {"sinks": {"flags": [f"stdout:?name={name}&batch_max_events=0"]}},
        {"sinks": {"flags": [f"stdout:?name={encoded}"]}},
        {"extraArgs": [f"--sink=stdout:?name={encoded}&level=Warnin"]},
        {"config": {"sinks": [{"type": "file", "url": f"/tmp/a.jsonl?name={encoded}"}]}},
    ):
        said = refusal(chart, values)
        assert said and SECRET not in said and "admin" not in said, (values, said)
        assert "the sink's name= holds a" in said or 'option "name" holds a URL' in said, (values, said)


def test_a_long_token_as_a_name_is_never_shown_and_a_plain_name_still_is(chart: helm.Chart) -> None:
    """A name of a name's characters, of a token's length and shape, is a name the router takes (and
    the chart renders), but no refusal of its entry shows it, nor two sinks of that name, nor NOTES: it
    is named by its type. A plain name (a name's characters, 12 at most or 32 without a digit) is
    still shown by each."""
    entry = {**LOKI, "name": LONG_TOKEN}
    for fault, extra in FAULTS.items():
        said = refusal(chart, {"config": {"sinks": [{**entry, **extra}]}})
        assert said and SECRET not in said, (fault, said)
        assert "its name not shown" in said or "config.sinks[0] url" in said, (fault, said)
    for values in (
        {"config": {"sinks": [entry, entry]}},
        {"config": {"sinks": [entry]}, "sinks": {"flags": [f"stdout:?name={LONG_TOKEN}"]}},
        {"sinks": {"flags": [f"stdout:?name={LONG_TOKEN}", f"file:/tmp/a?name={LONG_TOKEN}"]}},
        {"sinks": {"flags": [f"stdout:?name={LONG_TOKEN[:-1]}_", f"file:/tmp/a?name={LONG_TOKEN[:-1]}+"]}},
    ):
        said = refusal(chart, values)
        assert (
            "already used by" in said or "are both stored as one file name" in said
        ) and SECRET not in said, said
    notes = render(chart, {"config": {"sinks": [entry]}})[f"{CHART.name}/templates/NOTES.txt"]
    assert SECRET not in notes and "(a name not shown: it may hold a credential) (loki)" in notes
    for name in ("loki-prod", "es prod", "loki-production-eu", "audit_2"):
        for fault, extra in FAULTS.items():
            said = refusal(chart, {"config": {"sinks": [{**LOKI, "name": name, **extra}]}})
            assert f"config.sinks[0] ({name})" in said or "config.sinks[0] url" in said, (fault, said)
        values = {"config": {"sinks": [{**LOKI, "name": name}]}, "sinks": {"flags": [f"stdout:?name={name}"]}}
        assert f'sink name "{name}" is already used by config.sinks[0]' in refusal(chart, values)
        notes = render(chart, {"config": {"sinks": [{**LOKI, "name": name}]}})[
            f"{CHART.name}/templates/NOTES.txt"
        ]
        assert f"- {name} (loki)" in notes
