"""A config sink's `name:` (and a flag's `name=`) printed by the chart's refusals (session 36, review-b
F2 of item 314): every refusal of a config.sinks entry named it `config.sinks[i] (<name>)`, so a name
holding a URL's user info was printed whole by the very refusal of that user info, and a name holding
any other secret by each refusal of its entry. The router takes such a name and prints it in its logs
and metric labels.

Rendered by Helm's own engine (helm-python), as tests/test_chart_s36.py does.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest

from eventrouter.config import ConfigError, build_specs

CHART = Path(__file__).resolve().parents[1] / "charts" / "eventrouter"
RELEASE, NAMESPACE = "er", "monitoring"
SECRET = "S3cretXYZ"
Doc = dict[str, Any]

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


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: helm.Chart, values: Doc) -> dict[str, str]:
    return chart.render(values, name=RELEASE, namespace=NAMESPACE, is_upgrade=False, is_install=True)


def refusal(chart: helm.Chart, values: Doc) -> str:
    """The error text of a render the chart refuses ("" when it renders)."""
    try:
        render(chart, values)
    except (helm.HelmValuesError, helm.HelmRenderError) as exc:
        return str(exc)
    return ""


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
    assert router_takes([], [{"type": "stdout", "name": name}])  # so the chart must refuse it
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
