"""The chart's sink-name rule is the router's (item 339, session 37): a name holding ':', '=' or '@'
(item 323), a '/', a control character or more than 200 characters is refused, not shown, as the
router refuses it at start (exit 2). The chart refused only ':', '=' and '@': a name with a '/', a tab
or of 201 characters rendered, and the pod crash-looped. Every other name still renders.

Rendered by Helm's own engine (helm-python), as tests/test_chart_s36.py does.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator

import helm_python as helm
import pytest
from chart_helpers import CHART, Doc, refusal, render, router_refusal

SECRET = "S3cretXYZ"

REFUSED = {
    "slash": (f"logs/{SECRET}", "holds a '/'"),
    "control character": (f"es\t{SECRET}", "holds a control character"),
    "201 characters": (SECRET + "-" * 192, "is longer than 200 characters"),
}
"""Names the router refuses (exit 2) and the chart rendered, with the words of the chart's refusal."""

TAKEN = ["loki-prod", "es prod", "a+b", "_x", "é-1", "ab-" * 66 + "ab"]
"""Names both take: a space, a '+', a leading '_', non-ASCII, 200 characters."""


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def forms(name: str) -> dict[str, tuple[Doc, list[str], list[Doc]]]:
    """The ways a sink is named, each as (the chart's values, the router's flags and config sinks):
    a config `name:`, a config url's `name=`, a flag's `name=` and an extraArgs `--sink`'s `name=`
    (the last three percent-encoded, as the router decodes them)."""
    quoted = urllib.parse.quote(name, safe="")
    entry = {"type": "stdout", "name": name}
    in_url = {"type": "file", "url": f"/var/log/a.jsonl?name={quoted}"}
    flag = f"stdout:?name={quoted}"
    return {
        "config name": ({"config": {"sinks": [entry]}}, [], [entry]),
        "config url name=": ({"config": {"sinks": [in_url]}}, [], [in_url]),
        "flag": ({"sinks": {"flags": [flag]}}, [flag], []),
        "extraArgs": ({"extraArgs": [f"--sink={flag}"]}, [flag], []),
    }


@pytest.mark.parametrize("form", ["config name", "config url name=", "flag", "extraArgs"])
@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_name_the_router_refuses_is_refused_unshown(chart: helm.Chart, case: str, form: str) -> None:
    """Rendered before (the router then refused it: a crash-looping pod); now refused by the chart,
    the name not shown, as the router refuses it."""
    name, words = REFUSED[case]
    values, flags, sinks = forms(name)[form]
    assert router_refusal(flags, sinks), (case, form)  # the router refuses it (exit 2)
    said = refusal(chart, values)
    assert words in said and "the name is not shown" in said, said
    assert SECRET not in said, said


@pytest.mark.parametrize("form", ["config name", "config url name=", "flag", "extraArgs"])
@pytest.mark.parametrize("name", TAKEN)
def test_a_name_the_router_takes_still_renders(chart: helm.Chart, name: str, form: str) -> None:
    """The rule refuses only the marks of a credential, a path, control characters and length."""
    values, flags, sinks = forms(name)[form]
    assert router_refusal(flags, sinks) == "", (name, form)
    render(chart, values)


def test_a_percent_encoded_character_counts_once_toward_the_length(chart: helm.Chart) -> None:
    """The router decodes a query's name before counting: 200 `é` written `%C3%A9` (1200 characters)
    are a name of 200; a `%2F` is a '/' and a `%09` a control character."""
    taken = "stdout:?name=" + "%C3%A9" * 200
    assert router_refusal([taken], []) == ""
    render(chart, {"sinks": {"flags": [taken]}})
    for encoded, words in (("logs%2Fprod", "holds a '/'"), ("es%09prod", "holds a control character")):
        flag = f"stdout:?name={encoded}"
        assert router_refusal([flag], [])
        assert words in refusal(chart, {"sinks": {"flags": [flag]}})
