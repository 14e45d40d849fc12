"""deploy/ (plain manifests for users without Helm) and the container image's build files.

deploy/eventrouter.yaml must stay equivalent to the chart's default render; regenerate it with
`python tests/deploy/test_manifests.py --write` after changing the chart's defaults.
The Dockerfile's structure is checked here; tests/image builds the image and runs it (with buildah
and podman, no Docker engine: scripts/image-test.sh).
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import sys
import tomllib
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "eventrouter"
MANIFESTS = ROOT / "deploy" / "eventrouter.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
CONSTRAINTS = ROOT / "image-constraints.txt"
NAME = NAMESPACE = "eventrouter"

# Only Helm's bookkeeping differs between a Helm install and the plain manifests.
HELM_ONLY_LABELS = ("helm.sh/chart", "app.kubernetes.io/managed-by")
# What `helm uninstall` leaves; kubectl neither reads it nor has an uninstall.
HELM_ONLY_ANNOTATIONS = ("helm.sh/resource-policy",)

Doc = dict[str, Any]

HEADER = """\
# eventrouter plain manifests: the Helm chart's defaults (charts/eventrouter, release "eventrouter"
# in namespace "eventrouter") for users without Helm.
#   kubectl apply -f deploy/eventrouter.yaml
# Routes every Event occurrence to the pod's stdout; edit the ConfigMap's config.yaml to add sinks
# (credentials as env:NAME / file:/path references to a Secret, never literals). The router keeps its
# checkpoint in ConfigMap eventrouter-checkpoint (it creates it), so a new pod delivers nothing twice.
# Generated: python tests/deploy/test_manifests.py --write (tests/deploy/test_manifests.py keeps it
# equal to the chart).
"""

NAMESPACE_DOC: Doc = {
    "apiVersion": "v1",
    "kind": "Namespace",
    "metadata": {"name": NAMESPACE, "labels": {"app.kubernetes.io/name": NAME}},
}


def _strip_helm(doc: Doc) -> Doc:
    doc = copy.deepcopy(doc)
    labels = doc["metadata"].get("labels", {})
    for key in HELM_ONLY_LABELS:
        labels.pop(key, None)
    meta_annotations = doc["metadata"].get("annotations")
    if meta_annotations is not None:
        for key in HELM_ONLY_ANNOTATIONS:
            meta_annotations.pop(key, None)
        if not meta_annotations:
            del doc["metadata"]["annotations"]
    template = doc.get("spec", {}).get("template", {}).get("metadata")
    if template is not None:
        annotations = {
            k: v for k, v in template.get("annotations", {}).items() if not k.startswith("checksum/")
        }
        template.pop("annotations", None)
        if annotations:
            template["annotations"] = annotations
    return doc


def chart_default_objects() -> list[Doc]:
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render({}, name=NAME, namespace=NAMESPACE)
    docs: list[Doc] = []
    for path, text in sorted(rendered.items()):
        if not path.endswith("NOTES.txt"):
            docs.extend(_strip_helm(doc) for doc in yaml.safe_load_all(text) if doc)
    order = [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "Deployment",
    ]
    return sorted(docs, key=lambda d: order.index(d["kind"]) if d["kind"] in order else len(order))


def plain_objects() -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(MANIFESTS.read_text()) if doc]


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the ConfigMap's config.yaml) as readable `|` blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_BlockDumper.add_representer(str, _str)


def write_manifests() -> None:
    docs = [NAMESPACE_DOC, *chart_default_objects()]
    body = yaml.dump_all(docs, Dumper=_BlockDumper, sort_keys=False, width=110)
    MANIFESTS.write_text(HEADER + "---\n" + body)


def _key(doc: Doc) -> tuple[str, str, str]:
    return (doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"])


# --- plain manifests ---------------------------------------------------------------------------


def test_plain_manifests_equal_the_chart_default_render() -> None:
    plain = {_key(doc): doc for doc in plain_objects() if doc["kind"] != "Namespace"}
    chart = {_key(doc): doc for doc in chart_default_objects()}
    assert sorted(plain) == sorted(chart)
    for key, doc in chart.items():
        assert plain[key] == doc, f"deploy/eventrouter.yaml differs from the chart for {key}"


def test_plain_manifests_have_the_expected_kinds_in_apply_order() -> None:
    kinds = [doc["kind"] for doc in plain_objects()]
    assert kinds == [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "Deployment",
    ]
    for doc in plain_objects()[1:]:
        assert all(label not in doc["metadata"].get("labels", {}) for label in HELM_ONLY_LABELS)
        if doc["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert doc["metadata"]["namespace"] == NAMESPACE


def test_plain_clusterrole_only_reads_events() -> None:
    (role,) = [doc for doc in plain_objects() if doc["kind"] == "ClusterRole"]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["events"], "verbs": ["get", "list", "watch"]}]


def test_plain_manifests_keep_the_checkpoint_in_a_configmap_the_role_names() -> None:
    """An emptyDir checkpoint was lost with each new pod (a rollout restart after a config edit, a
    drain): everything the API server held went to every sink again. The checkpoint is in a
    ConfigMap, and the Role grants that one name (plus `create`, which RBAC cannot limit by name)."""
    (deployment,) = [doc for doc in plain_objects() if doc["kind"] == "Deployment"]
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert f"--checkpoint-configmap={NAME}-checkpoint" in args
    (role,) = [doc for doc in plain_objects() if doc["kind"] == "Role"]
    assert role["metadata"]["namespace"] == NAMESPACE
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]},
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": [f"{NAME}-checkpoint"],
            "verbs": ["get", "update"],
        },
    ]
    (binding,) = [doc for doc in plain_objects() if doc["kind"] == "RoleBinding"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": NAME, "namespace": NAMESPACE}]


def test_plain_manifests_give_the_router_the_pod_uid_beside_the_pod_name() -> None:
    """The leader election identity was the pod name alone, which a replacement pod of a StatefulSet
    shares with the pod it replaces: POD_UID (the pod's incarnation) goes beside POD_NAME."""
    (deployment,) = [doc for doc in plain_objects() if doc["kind"] == "Deployment"]
    env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    fields = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in env}
    assert fields == {
        "POD_NAME": "metadata.name",
        "POD_UID": "metadata.uid",
        "POD_NAMESPACE": "metadata.namespace",
    }


# --- Dockerfile --------------------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            result.append((op.upper(), rest.strip()))
    return result


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for op, rest in _instructions():
        if op == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((op, rest))
    return stages


def test_dockerfile_is_multi_stage_with_a_wheel_builder() -> None:
    stages = _stages()
    assert len(stages) >= 2
    builder, final = stages[0], stages[-1]
    # Both stages start from one base: python:3.11-slim unless a build argument names a mirror of it.
    assert ("ARG", "PYTHON_IMAGE=python:3.11-slim") in _instructions()[:1]
    assert re.fullmatch(r"\$\{PYTHON_IMAGE\} AS builder", builder[0][1], re.IGNORECASE)
    builder_runs = " ".join(rest for op, rest in builder if op == "RUN")
    assert "pip wheel" in builder_runs and ".[all]" in builder_runs, (
        "the builder builds wheels with every extra"
    )
    assert final[0][1] == "${PYTHON_IMAGE}"
    # The final stage gets wheels from the builder only, never the source tree.
    copies = [rest for op, rest in final if op == "COPY"]
    assert all(c.startswith("--from=builder") for c in copies)
    final_runs = " ".join(rest for op, rest in final if op == "RUN")
    assert "--mount=type=bind,from=builder" in final_runs
    assert "pip install" in final_runs and "--no-index" in final_runs and "eventrouter[all]" in final_runs


def test_dockerfile_runs_as_non_root_with_the_eventrouter_entrypoint() -> None:
    final = _stages()[-1]
    users = [rest for op, rest in final if op == "USER"]
    assert users and users[-1] in ("65532", "65532:65532")
    # Exec form (JSON), so signals reach the router directly: it is PID 1 and must see SIGTERM.
    entrypoint = [json.loads(rest) for op, rest in final if op == "ENTRYPOINT"]
    assert entrypoint == [["eventrouter"]]
    cmd = [json.loads(rest) for op, rest in final if op == "CMD"]
    assert cmd and cmd[-1][0] == "run"
    assert ("EXPOSE", "8080") in final
    labels = " ".join(rest for op, rest in final if op == "LABEL")
    for key in ("title", "description", "source", "licenses", "version"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_the_image_is_built_with_every_dependency_pinned_within_pyproject_s_ranges() -> None:
    """image-constraints.txt (scripts/image-lock.sh) pins each package exactly once, and every
    requirement of eventrouter[all] is pinned to a version its range in pyproject.toml admits."""
    builder_runs = " ".join(rest for op, rest in _stages()[0] if op == "RUN")
    assert "--constraint image-constraints.txt" in builder_runs
    pins: dict[str, Version] = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and canonicalize_name(name) not in pins, line
            pins[canonicalize_name(name)] = Version(version)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = [Requirement(r) for r in project["dependencies"]]
    wanted += [Requirement(r) for extra in ("kafka", "elasticsearch") for r in extras[extra]]
    assert extras["all"] == ["eventrouter[kafka,elasticsearch]"], "a new extra must be pinned here too"
    for req in wanted:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in image-constraints.txt: run scripts/image-lock.sh"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"image-constraints.txt pins {req.name} {pins[name]} outside {req.specifier}: run scripts/image-lock.sh"
        )


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, simplified: the last matching pattern wins; `!` re-includes; a directory
    pattern also covers everything below it."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if pattern.startswith("**/"):
            hit = any(fnmatch.fnmatch(part, pattern[3:]) for part in parts)
        else:
            hit = any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes)
        if hit:
            ignored = not negate
    return ignored


def test_dockerignore_keeps_the_package_and_drops_everything_else() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for path in (
        "tests/deploy/test_chart.py",
        "bench/run.py",
        ".git/HEAD",
        ".venv/bin/python",
        "venv/lib/x.py",
        "eventrouter/__pycache__/app.cpython-311.pyc",
        ".mypy_cache/3.11/x.json",
        ".pytest_cache/v/cache",
        ".ruff_cache/x",
        "charts/eventrouter/Chart.yaml",
        "eventrouter.egg-info/PKG-INFO",
        "build/lib/x.py",
        "dist/eventrouter-0.1.0.whl",
    ):
        assert _ignored(path, patterns), f"{path} should not be sent to the Docker build"
    for path in (
        "pyproject.toml",
        "image-constraints.txt",
        "README.md",
        "LICENSE",
        "eventrouter/__init__.py",
        "eventrouter/testing/data/watch.jsonl",
        "sinks/__init__.py",
        "sinks/loki.py",
    ):
        assert not _ignored(path, patterns), f"{path} is needed to build the wheel"


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write_manifests()
        print(f"wrote {MANIFESTS.relative_to(ROOT)}")
    else:
        sys.exit("usage: python tests/deploy/test_manifests.py --write")
