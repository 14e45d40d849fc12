"""What the chart tests share (tests/test_chart_*.py, tests/deploy/test_chart*.py): the chart rendered
by Helm's own engine (helm-python, no helm binary) as release `er` in namespace `monitoring`, what to
read off a render or a refusal, a copy of the chart with one template redefined, and the router's
verdict on the same sinks."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

from eventrouter.config import ConfigError, build_specs

CHART = Path(__file__).resolve().parents[1] / "charts" / "eventrouter"
RELEASE, NAMESPACE, FULLNAME = "er", "monitoring", "er-eventrouter"
Doc = dict[str, Any]
TOKEN_ENV = "ER_TEST_TOKEN"
"""The environment variable BASE's credentials refer to (`env:ER_TEST_TOKEN`): a test sets it."""

# A valid entry of each built-in type, to which one option is added.
BASE: dict[str, Doc] = {
    "stdout": {},
    "file": {"url": "/tmp/x"},
    "loki": {"url": "http://l:3100"},
    "kafka": {"url": "k:9092", "topic": "t"},
    "elasticsearch": {"url": "http://e:9200"},
    "opensearch": {"url": "http://e:9200"},
    "webhook": {"url": "http://h/x"},
    "dingtalk": {"access_token": f"env:{TOKEN_ENV}"},
    "wecom": {"key": f"env:{TOKEN_ENV}"},
    "wechat": {"key": f"env:{TOKEN_ENV}"},
    "sls": {
        "url": "https://cn-hangzhou.log.aliyuncs.com",
        "project": "p",
        "logstore": "l",
        "access_key_id": f"env:{TOKEN_ENV}",
        "access_key_secret": f"env:{TOKEN_ENV}",
    },
}


def render(chart: helm.Chart, values: Doc | None = None, *, upgrade: bool = False) -> dict[str, str]:
    """Each template's text by its path, as a first install (or an upgrade) renders it."""
    return chart.render(
        values or {}, name=RELEASE, namespace=NAMESPACE, is_upgrade=upgrade, is_install=not upgrade
    )


def refusal(chart: helm.Chart, values: Doc, *, upgrade: bool = False) -> str:
    """The error text of a render the chart refuses ("" when it renders)."""
    try:
        render(chart, values, upgrade=upgrade)
    except (helm.HelmValuesError, helm.HelmRenderError) as exc:
        return str(exc)
    return ""


def docs(rendered: dict[str, str]) -> list[Doc]:
    """The objects of a render: its YAML templates' documents, in the templates' order."""
    return [
        d
        for p, text in sorted(rendered.items())
        if p.endswith(".yaml")
        for d in yaml.safe_load_all(text)
        if d
    ]


def deployment(chart: helm.Chart, values: Doc, *, upgrade: bool = False) -> Doc:
    """The one Deployment the chart renders."""
    rendered = docs(render(chart, values, upgrade=upgrade))
    (found,) = [d for d in rendered if isinstance(d, dict) and d.get("kind") == "Deployment"]
    return found


def notes(chart: helm.Chart, values: Doc | None = None, *, upgrade: bool = False) -> str:
    """NOTES.txt as rendered, its white space made single spaces."""
    return " ".join(render(chart, values, upgrade=upgrade)[f"{CHART.name}/templates/NOTES.txt"].split())


def chart_with(tmp: Path, template: str, text: str, name: str = CHART.name) -> Path:
    """A copy of the chart (named `name`, as Helm names an aliased subchart) whose `template` (a define
    of _helpers.tpl) renders `text`."""
    copy = tmp / name
    shutil.copytree(CHART, copy)
    if name != CHART.name:
        chart_yaml = copy / "Chart.yaml"
        chart_yaml.write_text(chart_yaml.read_text().replace(f"name: {CHART.name}", f"name: {name}", 1))
    # Parsed after _helpers.tpl (Helm parses a folder's templates in reverse name order): it wins.
    (copy / "templates" / "_a_live.tpl").write_text(
        f'{{{{- define "{template}" -}}}}\n{text}{{{{- end -}}}}\n'
    )
    return copy


def sink_flag(sink_type: str, extra: str) -> str:
    """The --sink flag of BASE's entry of `sink_type`, `extra` (`key=value&…`) added to its query."""
    base = BASE[sink_type]
    query = "&".join(f"{k}={v}" for k, v in base.items() if k != "url")
    return f"{sink_type}:{base.get('url', '')}?" + "&".join(q for q in (query, extra) if q)


def router_refusal(flags: list[str], sinks: list[Doc]) -> str:
    """The router's refusal of these sinks ("" when it takes them)."""
    try:
        build_specs(flags, sinks)
    except ConfigError as exc:
        return str(exc)
    return ""
