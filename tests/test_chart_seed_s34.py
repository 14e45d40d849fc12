"""Item 286, the chart's part: mode dataDir runs the router with `--checkpoint-seed-configmap` (the
ConfigMap mode configMap writes) and a Role granting `get` on that one name, so that the upgrade from
checkpoint.mode configMap to dataDir delivers nothing twice.

The `lookup` of the live Deployment is empty without a cluster (helm-python renders client-side): a
copy of the chart redefines `eventrouter.liveWorkload` to return the previous revision's Deployment,
as tests/test_chart_s34.py does.
"""

from __future__ import annotations

import collections
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from eventrouter.record import occurrence_number
from eventrouter.testing import FakeApiServer, event_object
from eventrouter.testing.chart_pod import ChartPod
from eventrouter.testing.waiting import until

CHART = Path(__file__).resolve().parents[1] / "charts" / "eventrouter"
RELEASE, NAMESPACE, FULLNAME = "er", "monitoring", "er-eventrouter"
CHECKPOINT = f"{FULLNAME}-checkpoint"
TO_DATA_DIR: dict[str, Any] = {"checkpoint": {"mode": "dataDir"}, "persistence": {"enabled": True}}
Doc = dict[str, Any]


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render_text(chart: helm.Chart, values: Doc | None = None) -> dict[str, str]:
    return chart.render(values or {}, name=RELEASE, namespace=NAMESPACE)


def render(chart: helm.Chart, values: Doc | None = None) -> list[Doc]:
    docs: list[Doc] = []
    for path, text in sorted(render_text(chart, values).items()):
        if not path.endswith("NOTES.txt"):
            docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def notes(chart: helm.Chart, values: Doc | None = None) -> str:
    text = render_text(chart, values)[f"{CHART.name}/templates/NOTES.txt"]
    return " ".join(text.split())


def named(docs: list[Doc], kind: str, name: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]


def deployment(docs: list[Doc]) -> Doc:
    (found,) = [d for d in docs if d["kind"] == "Deployment"]
    return found


def args(docs: list[Doc]) -> list[str]:
    return list(deployment(docs)["spec"]["template"]["spec"]["containers"][0]["args"])


def chart_with_live(tmp: Path, live: Doc) -> Path:
    """A copy of the chart whose `lookup` of the release's workload finds `live`."""
    copy = tmp / "chart-with-live" / CHART.name
    shutil.copytree(CHART, copy)
    # Parsed after _helpers.tpl (Helm parses a folder's templates in reverse name order): it wins.
    (copy / "templates" / "_a_live.tpl").write_text(
        '{{- define "eventrouter.liveWorkload" -}}\n' + yaml.safe_dump(live) + "{{- end -}}\n"
    )
    return copy


def granted(role: Doc) -> set[tuple[str, str]]:
    return {
        (verb, name)
        for rule in role["rules"]
        for verb in rule["verbs"]
        for name in rule.get("resourceNames", [""])
    }


# ---- the render -----------------------------------------------------------------------------------


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
        "data dir. The new pod's first start on the empty data dir takes that ConfigMap's checkpoint over"
        in said
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
        "Switching modes on an installed release: configMap -> dataDir delivers nothing twice (the first start on "
        "the new data dir takes the ConfigMap's checkpoint over)" in values
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


def pod(docs: list[Doc], api: FakeApiServer, tmp: Path, name: str, data: Path | None = None) -> ChartPod:
    """One pod of a render as a process: an emptyDir of its own, or ``data`` (the claim)."""
    (cm,) = named(docs, "ConfigMap", FULLNAME)
    container = deployment(docs)["spec"]["template"]["spec"]["containers"][0]
    return ChartPod(cm["data"]["config.yaml"], container, api, tmp, name, NAMESPACE, data)


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
