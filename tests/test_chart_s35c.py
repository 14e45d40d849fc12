"""The chart faults of session 35's review of item 310 (item 314): a config.sinks `type` printed whole
in every refusal of its sink, an umbrella chart's `condition: eventrouter.enabled` refused by the
schema, a credentials.env name holding `=` told to keep the `=`, and a credential-shaped value of an
option beside a credential printed by the value-shown rule.

Rendered by Helm's own engine (helm-python), as tests/test_chart_s35b.py does.
"""

from __future__ import annotations

import shutil
import textwrap
from collections.abc import Iterator
from pathlib import Path

import helm_python as helm
import pytest
from chart_helpers import CHART, Doc, docs, refusal, render, router_refusal

SECRET = "S3cretXYZ"


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def kinds(rendered: dict[str, str]) -> list[str]:
    return [d["kind"] for d in docs(rendered) if isinstance(d, dict)]


# --- F1: a config.sinks type printed whole ------------------------------------------------------

TYPES: dict[str, Doc] = {
    "a loki flag ported whole": {"type": f"loki:http://admin:{SECRET}@loki:3100"},
    "a webhook flag, another option refused": {
        "type": f"webhook:https://admin:{SECRET}@h.example/x",
        "bearer_token": "abc",
    },
    "a type and a credential, no //": {"type": f"Loki:{SECRET}"},
    "white space around": {"type": f" loki {SECRET}"},
}


@pytest.mark.parametrize("case", sorted(TYPES))
def test_a_config_sink_type_that_is_no_type_is_refused_unshown(chart: helm.Chart, case: str) -> None:
    """`type: loki:http://admin:S3cret@loki:3100` (a flag ported into the config) was printed whole in
    every refusal of that sink, the user-info refusal included, and `Loki:S3cret` rendered (taken for a
    plugin's type) for the router to print at start. Refused as a flag's type is, not shown."""
    said = refusal(chart, {"config": {"sinks": [TYPES[case]]}})
    assert 'config.sinks[0]: option "type" is no sink type' in said, said
    assert SECRET not in said, said
    assert router_refusal([], [TYPES[case]])  # the router refuses it too (exit 2)
    # A plugin's type still renders.
    for sink_type in ("myCorp.Sink", "my_corp-sink2"):
        assert "Deployment" in kinds(render(chart, {"config": {"sinks": [{"type": sink_type}]}}))


# --- F4: an umbrella chart's condition ----------------------------------------------------------


@pytest.fixture(scope="module")
def umbrella(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A parent chart holding this one with Helm's documented `condition: eventrouter.enabled`."""
    root = tmp_path_factory.mktemp("umbrella")
    shutil.copytree(CHART, root / "charts" / CHART.name)
    (root / "Chart.yaml").write_text(
        textwrap.dedent(
            f"""\
            apiVersion: v2
            name: platform
            version: 0.1.0
            dependencies:
              - name: {CHART.name}
                version: ">=0.0.0-0"
                repository: file://charts/{CHART.name}
                condition: {CHART.name}.enabled
            """
        )
    )
    (root / "values.yaml").write_text(f"{CHART.name}:\n  enabled: true\n")
    return root


def umbrella_render(root: Path, values: Doc) -> dict[str, str] | str:
    """The umbrella's render, or its refusal. Loaded afresh: Helm drops a disabled dependency from the
    loaded chart itself, so a render after `enabled: false` would not hold it."""
    with helm.Chart.load(root) as loaded:
        try:
            return render(loaded, values)
        except (helm.HelmValuesError, helm.HelmRenderError) as exc:
            return str(exc)


def test_an_umbrella_chart_turns_the_router_on_and_off_by_condition(umbrella: Path) -> None:
    """Helm passes the condition's `enabled: true` into this chart's values, and the schema refused it
    (`additional properties 'enabled' not allowed`): no umbrella could hold it by condition."""
    for values in ({}, {CHART.name: {"enabled": True}}):
        rendered = umbrella_render(umbrella, values)
        assert isinstance(rendered, dict) and "Deployment" in kinds(rendered), rendered
    assert umbrella_render(umbrella, {CHART.name: {"enabled": False}}) == {}
    assert "at '/enabled': got string, want boolean" in str(
        umbrella_render(umbrella, {CHART.name: {"enabled": "yes"}})
    )


def test_enabled_is_taken_and_ignored_by_the_chart_alone(chart: helm.Chart) -> None:
    """Only a boolean: the switch of a parent's condition, nothing else."""
    assert render(chart, {"enabled": True}) == render(chart, {})
    assert "at '/enabled': got string, want boolean" in refusal(chart, {"enabled": "yes"})


# --- F3: a credentials.env name holding `=` ------------------------------------------------------


def test_an_env_name_holding_an_equals_sign_is_told_where_the_value_goes(chart: helm.Chart) -> None:
    """`name: LOKI_PASSWORD=S3cret` was refused with "did you mean LOKI_PASSWORD=…?": the spelling
    refused. The hint names the variable alone and where its value goes."""
    values = {"credentials": {"values": {"k": "x"}, "env": [{"name": f"LOKI_PASSWORD={SECRET}", "key": "k"}]}}
    said = refusal(chart, values)
    assert "did you mean name: LOKI_PASSWORD?" in said, said
    assert "the value goes in credentials.values" in said, said
    assert "LOKI_PASSWORD=…?" not in said and SECRET not in said, said


# --- F2: a credential-shaped value shown --------------------------------------------------------

TYPOS = {
    "webhook:https://h.example/x?mode=Batch": 'option "mode" is "Batch"',
    "webhook:https://h.example/x?send_timeout=5s": 'option "send_timeout" is "5s"',
    "stdout:?name=w&level=Warnin": 'option "level" is "Warnin"',
}
KEY30 = "LTAI5tAbCdEfGhIjKlMnOpQrStUvWx"  # an SLS AccessKeySecret's shape: 30 letters and digits


@pytest.mark.parametrize(
    "flag",
    [
        f"webhook:https://h.example/x?signature={SECRET}",  # the HMAC key in the option beside `secret`
        f"webhook:https://h.example/x?signature={KEY30}",
        f"webhook:https://h.example/x?mode={KEY30}",  # long: not a typo of an allowed value
        f"kafka:kafka:9092?topic=t&key_by={SECRET}",
    ],
)
def test_a_credential_shaped_value_is_not_shown(chart: helm.Chart, flag: str) -> None:
    """The value-shown rule showed any value of a name's characters up to 32 long: an AccessKeySecret,
    an HMAC key put in `signature=`. The router shows none."""
    said = refusal(chart, {"sinks": {"flags": [flag]}})
    assert "has a value not shown" in said, said
    assert SECRET not in said and KEY30 not in said, said
    assert router_refusal([flag], [])
    # A typo is still shown: an enum's, a number's (a flag's and a config string's).
    for typo, shown in TYPOS.items():
        assert shown in refusal(chart, {"sinks": {"flags": [typo]}}), typo
    entry = {"type": "webhook", "url": "https://h.example/x", "send_timeout": "10s"}
    assert 'option "send_timeout" is "10s"' in refusal(chart, {"config": {"sinks": [entry]}})
