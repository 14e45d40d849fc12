"""The chart faults of session 35's review of item 303 (item 310): a credential typed `name:value` in the
credentials, the top level or config printed by Helm's schema, a value holding the rest of a `;`
query printed whole, a webhook sink's option values never judged, a sibling router of an umbrella
release taken for this one, the namespace's workloads listed on every install and 5 times a render,
and a built-in type in another case taken for a plugin's.

Rendered by Helm's own engine (helm-python). Its `lookup` is empty without a cluster: a copy of the
chart redefines the template that calls it, as tests/test_chart_s35.py does.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import helm_python as helm
import pytest
import yaml
from chart_helpers import (
    CHART,
    FULLNAME,
    RELEASE,
    Doc,
    chart_with,
    deployment,
    notes,
    refusal,
    render,
    router_refusal,
)

SECRET = "Hunter2xyz"


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


# --- F1: a credential typed name:value in any object whose schema was closed ------------------------

TYPED: dict[str, Doc] = {
    "credentials.values {K:S}": {"credentials": {"values": {f"LOKI_PASSWORD:{SECRET}": None}}},
    "credentials.env {value:S}": {
        "credentials": {
            "values": {"LOKI_PASSWORD": "x"},
            "env": [{"name": "LOKI_PASSWORD", "key": "LOKI_PASSWORD", f"value:{SECRET}": None}],
        }
    },
    "credentials.env name=S": {
        "credentials": {"values": {"k": "x"}, "env": [{"name": f"LOKI_PASSWORD={SECRET}", "key": "k"}]}
    },
    "credentials {password:S}": {"credentials": {f"password:{SECRET}": None}},
    "top level {lokiPassword:S}": {f"lokiPassword:{SECRET}": None},
    "config {token:S}": {"config": {"sinks": [{"type": "stdout"}], f"token:{SECRET}": None}},
    "imagePullSecrets {name:S}": {"imagePullSecrets": [{"name": "regcred", f"token:{SECRET}": None}]},
}


@pytest.mark.parametrize("case", sorted(TYPED))
def test_a_credential_typed_name_colon_value_is_never_printed_in_the_credentials_or_the_top_level(
    chart: helm.Chart, case: str
) -> None:
    """`credentials: {values: {LOKI_PASSWORD:S3cret}}` (a YAML flow without a space) is one key holding
    the password, and Helm's schema errors (`at '/credentials/values/LOKI_PASSWORD:S3cret': got null`,
    `additional properties 'password:S3cret' not allowed`, `'LOKI_PASSWORD=S3cret' does not match
    pattern`) printed it into `helm upgrade`'s output, CI logs and Argo CD. Item 303 fixed it for
    config.sinks and extraEnv only. Refused, shown as the router shows an option."""
    said = refusal(chart, TYPED[case])
    assert said, "rendered"
    assert SECRET not in said, said
    assert "(the rest not shown: did you mean" in said, said
    # The checks moved from the schema to the templates take what the schema took.
    values: Doc = {
        "credentials": {
            "values": {"LOKI_PASSWORD": "x", "tls.key-2": "y"},
            "env": [{"name": "LOKI_PASSWORD", "key": "LOKI_PASSWORD"}, {"name": "_X1", "key": "tls.key-2"}],
        },
        "imagePullSecrets": [{"name": "regcred"}],
        "config": {"sinks": [{"type": "stdout"}], "field_selector": "type=Warning"},
    }
    env = deployment(chart, values)["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"LOKI_PASSWORD", "_X1"} <= {e["name"] for e in env}


# --- F2: a value holding the rest of the query ---------------------------------------------------

OUT: Doc = {"type": "stdout", "name": "out"}  # extraArgs sinks alone are "no sinks configured" (item 290)
OPTIONS = {"batch_max_events": "5", "format": "json", "level": "Warning"}  # a number, an enum, a pattern


def _places(key: str, value: str) -> dict[str, Doc]:
    query = f"username=er&{key}={value}"
    return {
        "flag": {"config": {"sinks": []}, "sinks": {"flags": [f"loki:http://l:3100?{query}"]}},
        "extraArgs": {"config": {"sinks": [OUT]}, "extraArgs": [f"--sink=loki:http://l:3100?{query}"]},
        "config url": {"config": {"sinks": [{"type": "loki", "url": f"http://l:3100?{query}"}]}},
    }


@pytest.mark.parametrize("key", sorted(OPTIONS))
def test_a_value_holding_the_rest_of_the_query_is_never_printed(chart: helm.Chart, key: str) -> None:
    """`?batch_max_events=5;password=S3cret` (`;` as the old query separator, on which Python no longer
    splits) is one value `5;password=S3cret` to the router, which refuses it without showing it; the
    chart's refusal printed it whole. Refused in a flag, an extraArgs --sink and a config url's query,
    the value not shown, and the `;` named."""
    for place, values in _places(key, f"{OPTIONS[key]};password={SECRET}").items():
        said = refusal(chart, values)
        assert f'option "{key}" has a value not shown' in said, (place, said)
        assert "a ';' is no query separator to the router: use '&'" in said, (place, said)
        assert SECRET not in said, (place, said)
        flags = [*values.get("sinks", {}).get("flags", []), *(a[7:] for a in values.get("extraArgs", []))]
        assert router_refusal(flags, values["config"]["sinks"]), place
    # A value of a number's or a name's characters is still shown.
    assert f'option "{key}" is "x5x", must be' in refusal(chart, _places(key, "x5x")["flag"])


def test_a_config_string_holding_more_than_a_number_is_not_printed(chart: helm.Chart) -> None:
    entry = {"type": "stdout", "batch_max_events": f"password:{SECRET}"}
    said = refusal(chart, {"config": {"sinks": [entry]}})
    assert 'option "batch_max_events" has a value not shown' in said and SECRET not in said, said
    assert router_refusal([], [entry])


# --- F3: a webhook sink's option values --------------------------------------------------------------

WEBHOOK_WRONG = [
    "batch_max_events=0",
    "batch_max_events=abc",
    "batch_max_events=5s",
    "send_timeout=10s",
    "level=Warnin",
    "retry_max_attempts=-1",
    "queue_size=x",
]


@pytest.mark.parametrize("query", WEBHOOK_WRONG)
def test_a_webhook_sinks_option_values_are_judged_as_any_sinks(chart: helm.Chart, query: str) -> None:
    """files/sink-options.json left the webhook out (its unknown query keys stay in its URL), so none of
    its option values was judged: `batch_max_events=0` in a flag or a config url's query, `send_timeout:
    "10s"` in config.sinks rendered, and the pod exited 2 (with Recreate, replacing the working one)."""
    key, value = query.split("=")
    places = {
        "flag": ([f"webhook:http://h/x?{query}"], []),
        "config url": ([], [{"type": "webhook", "url": f"http://h/x?a=1&{query}"}]),
        "config": ([], [{"type": "webhook", "url": "http://h/x", key: value}]),
    }
    for place, (flags, sinks) in places.items():
        assert router_refusal(flags, sinks), place
        said = refusal(chart, {"config": {"sinks": sinks}, "sinks": {"flags": flags}})
        assert said, (place, "rendered")
        if place != "config" or key != "level":  # else the schema's pattern, as before
            assert "(webhook" in said, said
    # The keys that are no option stay in the URL: not refused, whatever their value.
    flag = "webhook:http://h/x?sig=ab:cd&Level=x&unknown=1&unknown=2&batch_max_events=5&time=12:30"
    sinks = [{"type": "webhook", "name": "w", "url": "http://h/y?json&x=1&y&send_timeout=2.5"}]
    render(chart, {"config": {"sinks": sinks}, "sinks": {"flags": [flag]}})
    assert router_refusal([flag], sinks) == ""


# --- F4: a sibling router of an umbrella release -------------------------------------------------


def _annotated(live: Doc) -> Doc:
    live["metadata"]["annotations"] = {"meta.helm.sh/release-name": RELEASE}
    return live


def test_a_sibling_router_of_an_umbrella_release_is_not_taken_for_this_one(
    chart: helm.Chart, tmp_path: Path
) -> None:
    """An umbrella release holding the chart twice, as `eventrouter` and aliased `eventrouter-audit`
    (label helm.sh/chart: eventrouter-audit-0.1.0): an upgrade adding the `eventrouter` instance took
    the sibling for this router under a former name (a `helm.sh/chart` prefix match), made the new
    Deployment Recreate, and NOTES said to delete the sibling's live checkpoint ConfigMap."""
    with helm.Chart.load(chart_with(tmp_path / "a", "eventrouter.x", "", name="eventrouter-audit")) as audit:
        sibling = _annotated(deployment(audit, {}))
    assert sibling["metadata"]["labels"]["helm.sh/chart"].startswith("eventrouter-audit-")
    listed = yaml.safe_dump({"items": [sibling]})
    values: Doc = {"leaderElection": {"enabled": True}}
    with helm.Chart.load(chart_with(tmp_path / "b", "eventrouter.releaseWorkloads", listed)) as upgrading:
        said = notes(upgrading, values, upgrade=True)
        strategy = deployment(upgrading, values, upgrade=True)["spec"]["strategy"]
    assert "WARNING:" not in said, said
    assert strategy == deployment(chart, values)["spec"]["strategy"]  # a first install's
    assert strategy["type"] == "RollingUpdate"
    # This router, of an older chart version (a prerelease, build metadata), is still found.
    ours = _annotated(deployment(chart, {}))
    ours["metadata"]["labels"]["helm.sh/chart"] = "eventrouter-0.0.9-rc.1_build.5"
    listed = yaml.safe_dump({"items": [sibling, ours]})
    with helm.Chart.load(chart_with(tmp_path / "c", "eventrouter.releaseWorkloads", listed)) as upgrading:
        said = notes(upgrading, {"fullnameOverride": "events"}, upgrade=True)
    assert f"renamed the release's router from deployment/{FULLNAME} to deployment/events" in said


# --- F5: the namespace's workloads listed on a first install, 5 times a render -----------------------

ONCE = """{{- if hasKey $ "listedBefore" -}}{{- fail "the workloads were listed twice in one render" -}}{{- end -}}
{{- $_ := set $ "listedBefore" true -}}
{}
"""


def test_the_namespace_is_listed_once_a_render_and_never_on_a_first_install(
    chart: helm.Chart, tmp_path: Path
) -> None:
    """Item 303's rename lookup lists the namespace's Deployments whenever none has the release's name:
    on every first install, where a role without `list` on deployments failed the render (Helm's
    lookup returns a 403 as an error), and once for each of the 5 templates asking for the live
    workload. Now only on an upgrade, and once a render."""
    with helm.Chart.load(chart_with(tmp_path / "a", "eventrouter.releaseWorkloads", ONCE)) as counted:
        for upgrade in (False, True):
            render(counted, {"leaderElection": {"enabled": True}}, upgrade=upgrade)
    forbidden = '{{- fail "deployments.apps is forbidden: cannot list resource" -}}\n'
    with helm.Chart.load(chart_with(tmp_path / "b", "eventrouter.listWorkloads", forbidden)) as listing:
        render(listing, {})  # a first install asks for no list
        assert "cannot list resource" in refusal(listing, {}, upgrade=True)


# --- F6: a built-in type in another case --------------------------------------------------------------

TYPES = {"Loki": "loki:http://l:3100", "STDOUT": "stdout:?level=Warning", "Webhook": "webhook:http://h/x"}


@pytest.mark.parametrize("typed", sorted(TYPES))
def test_a_built_in_type_in_another_case_is_refused_naming_its_spelling(
    chart: helm.Chart, typed: str
) -> None:
    """`Loki:http://loki:3100` or a config.sinks `type: Loki` was taken for a plugin's type (nothing
    checked) and the router, which matches types exactly, exited 2 ("unknown sink type 'Loki'")."""
    right = TYPES[typed]
    flag = typed + right[len(typed) :]
    url = right.split(":", 1)[1].split("?")[0]
    entry: Doc = {"type": typed, **({"url": url} if url else {})}
    places: dict[str, tuple[Doc, list[str], list[Doc]]] = {
        "flag": ({"config": {"sinks": []}, "sinks": {"flags": [flag]}}, [flag], []),
        "extraArgs": ({"config": {"sinks": [OUT]}, "extraArgs": [f"--sink={flag}"]}, [flag], [OUT]),
        "config": ({"config": {"sinks": [entry]}}, [], [entry]),
    }
    for place, (values, flags, sinks) in places.items():
        said = refusal(chart, values)
        assert f'sink type "{typed}" is no type' in said, (place, said)
        assert f"did you mean {typed.lower()}?" in said, (place, said)
        assert "unknown sink type" in router_refusal(flags, sinks), place
