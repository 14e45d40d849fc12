"""The Helm chart, rendered and linted by Helm's own engine (helm-python-sdk, no helm binary).

Each feature switch is rendered and the resulting objects are checked: RBAC rules exactly, no
credential outside the Secret, probes and the security context on every variant.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from eventrouter.record import normalise
from eventrouter.testing import recorded_watch

CHART = Path(__file__).resolve().parents[2] / "charts" / "eventrouter"
RELEASE = "er"
NAMESPACE = "monitoring"
FULLNAME = "er-eventrouter"
SECRET_VALUE = "hunter2-S3cr3t-Value"

EVENTS_RULE = {"apiGroups": [""], "resources": ["events"], "verbs": ["get", "list", "watch"]}

Doc = dict[str, Any]


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render_text(chart: helm.Chart, values: dict[str, Any] | None = None) -> dict[str, str]:
    return chart.render(values or {}, name=RELEASE, namespace=NAMESPACE)


def parse(rendered: dict[str, str]) -> list[Doc]:
    docs: list[Doc] = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


def render(chart: helm.Chart, values: dict[str, Any] | None = None) -> list[Doc]:
    return parse(render_text(chart, values))


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [doc for doc in of_kind(docs, kind) if name is None or doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def container(docs: list[Doc]) -> Doc:
    containers = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    result: Doc = containers[0]
    return result


def pod_spec(docs: list[Doc]) -> Doc:
    spec: Doc = one(docs, "Deployment")["spec"]["template"]["spec"]
    return spec


def volumes(docs: list[Doc]) -> dict[str, Doc]:
    return {vol["name"]: vol for vol in pod_spec(docs)["volumes"]}


def mounts(docs: list[Doc]) -> dict[str, Doc]:
    return {mount["name"]: mount for mount in container(docs)["volumeMounts"]}


def bound_subjects(binding: Doc) -> list[tuple[str, str, str]]:
    return [(s["kind"], s["name"], s["namespace"]) for s in binding["subjects"]]


def ci_values(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((CHART / "ci" / name).read_text())
    return loaded


VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "ha": ci_values("ha-values.yaml"),
    "namespaced": ci_values("namespaced-values.yaml"),
    "full": ci_values("full-values.yaml"),
}


# --- lint and schema ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lint_passes_strict(variant: str) -> None:
    report = helm.lint(CHART, VARIANTS[variant], strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize(
    "values",
    [
        {"replicaCount": "two"},
        {"leaderElection": {"enabled": "yes"}},
        {"checkpoint": {"mode": "disk"}},
        {"logLevel": "verbose"},
        {"watchNamespaces": "payments"},
        {"sinks": {"flags": ["no-type-prefix"]}},
        {"config": {"sinks": [{"name": "missing-type"}]}},
        {"credentials": {"values": {"token": 123}}},
        {"replicas": 2},
    ],
    ids=lambda v: json.dumps(v, sort_keys=True),
)
def test_schema_rejects_wrong_values(chart: helm.Chart, values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values)
    with pytest.raises(helm.HelmValuesError):
        render(chart, values)


def test_schema_accepts_every_ci_values_file(chart: helm.Chart) -> None:
    for values in VARIANTS.values():
        chart.validate_schema(chart.merge_values(values))


# --- defaults ----------------------------------------------------------------------------------


def test_default_render_has_exactly_the_plain_install_objects(chart: helm.Chart) -> None:
    kinds = sorted(doc["kind"] for doc in render(chart))
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "ConfigMap", "Deployment", "ServiceAccount"]


def test_default_rbac_is_exactly_events_get_list_watch(chart: helm.Chart) -> None:
    docs = render(chart)
    assert one(docs, "ClusterRole")["rules"] == [EVENTS_RULE]
    assert of_kind(docs, "Role") == [] and of_kind(docs, "RoleBinding") == []
    binding = one(docs, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": FULLNAME,
    }
    sa = one(docs, "ServiceAccount")
    assert bound_subjects(binding) == [("ServiceAccount", sa["metadata"]["name"], NAMESPACE)]
    assert pod_spec(docs)["serviceAccountName"] == sa["metadata"]["name"]


def test_default_probes_ports_and_resources(chart: helm.Chart) -> None:
    c = container(render(chart))
    assert c["ports"] == [{"name": "metrics", "containerPort": 8080, "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert c["resources"]["requests"] == {"cpu": "50m", "memory": "128Mi"}
    assert c["resources"]["limits"] == {"memory": "256Mi"}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_security_context_is_locked_down(chart: helm.Chart, variant: str) -> None:
    docs = render(chart, VARIANTS[variant])
    pod = pod_spec(docs)["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] == 65532
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container(docs)["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["runAsUser"] == 65532
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    # A read-only root still needs a writable /tmp.
    assert mounts(docs)["tmp"]["mountPath"] == "/tmp"
    assert "emptyDir" in volumes(docs)["tmp"]


def test_default_args_env_and_config(chart: helm.Chart) -> None:
    docs = render(chart)
    c = container(docs)
    assert c["args"] == [
        "run",
        "--config=/etc/eventrouter/config.yaml",
        "--metrics-addr=0.0.0.0:8080",
        "--log-format=json",
        "--log-level=info",
        "--shutdown-timeout=25",
        "--data-dir=/var/lib/eventrouter",
        "--data-dir-max-bytes=1Gi",  # the emptyDir's sizeLimit: spools and dead letters fit in it
    ]
    assert "command" not in c  # the image's ENTRYPOINT is `eventrouter`
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in c["env"]}
    assert env == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}
    config = yaml.safe_load(one(docs, "ConfigMap")["data"]["config.yaml"])
    assert config == {"sinks": [{"type": "stdout", "name": "stdout"}]}
    assert mounts(docs)["config"]["mountPath"] == "/etc/eventrouter/config.yaml"
    assert volumes(docs)["config"]["configMap"]["name"] == FULLNAME


def test_default_data_dir_is_an_emptydir(chart: helm.Chart) -> None:
    docs = render(chart)
    assert volumes(docs)["data"]["emptyDir"] == {"sizeLimit": "1Gi"}
    assert mounts(docs)["data"]["mountPath"] == "/var/lib/eventrouter"
    assert of_kind(docs, "PersistentVolumeClaim") == []


def test_default_is_one_replica_with_recreate_strategy(chart: helm.Chart) -> None:
    spec = one(render(chart), "Deployment")["spec"]
    assert spec["replicas"] == 1
    # Two routers without leader election would both deliver during a rolling update.
    assert spec["strategy"] == {"type": "Recreate"}


def test_termination_grace_exceeds_shutdown_timeout(chart: helm.Chart) -> None:
    docs = render(chart)
    args = container(docs)["args"]
    timeout = int(next(a for a in args if a.startswith("--shutdown-timeout=")).split("=")[1])
    assert pod_spec(docs)["terminationGracePeriodSeconds"] > timeout
    with pytest.raises(helm.HelmRenderError, match="terminationGracePeriodSeconds"):
        render(chart, {"shutdownTimeout": 30, "terminationGracePeriodSeconds": 30})
    # After the drain: spools, the checkpoint and the lease release still need their seconds.
    with pytest.raises(helm.HelmRenderError, match="at least 5 s below terminationGracePeriodSeconds"):
        render(chart, {"shutdownTimeout": 29, "terminationGracePeriodSeconds": 30})
    render(chart, {"shutdownTimeout": 25, "terminationGracePeriodSeconds": 30})


def test_a_rolling_update_without_leader_election_is_refused(chart: helm.Chart) -> None:
    """The old and the new pod would both deliver during the rollout."""
    with pytest.raises(helm.HelmRenderError, match="RollingUpdate needs leaderElection"):
        render(chart, {"strategy": {"type": "RollingUpdate"}})


@pytest.mark.parametrize("modes", [["ReadWriteOnce"], ["ReadWriteOncePod"]])
def test_a_leader_on_a_readwriteonce_claim_goes_before_its_successor_starts(
    chart: helm.Chart, modes: list[str]
) -> None:
    """A surged pod on another node cannot attach the claim (or, ReadWriteOncePod, is never
    scheduled), and the old pod waited for it to be ready: the rollout hung."""
    values = {"leaderElection": {"enabled": True}, "persistence": {"enabled": True, "accessModes": modes}}
    strategy = one(render(chart, values), "Deployment")["spec"]["strategy"]
    assert strategy == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    shared = {
        "leaderElection": {"enabled": True},
        "persistence": {"enabled": True, "accessModes": ["ReadWriteMany"]},
    }
    assert one(render(chart, shared), "Deployment")["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 1


# --- sinks and credentials ---------------------------------------------------------------------


def test_sink_flags_become_sink_args_and_config_block_the_config_file(chart: helm.Chart) -> None:
    flag = "loki:http://loki.monitoring:3100?labels=cluster,namespace"
    sink = {"type": "kafka", "name": "kafka", "url": "kafka-0:9092", "topic": "kube-events"}
    docs = render(chart, {"sinks": {"flags": [flag]}, "config": {"sinks": [sink]}})
    assert f"--sink={flag}" in container(docs)["args"]
    assert yaml.safe_load(one(docs, "ConfigMap")["data"]["config.yaml"]) == {"sinks": [sink]}


def test_no_sinks_at_all_is_refused(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmRenderError, match="no sinks configured"):
        render(chart, {"config": {"sinks": []}})


SECRET_VALUES: dict[str, Any] = {
    "sinks": {"flags": ["dingtalk:https://oapi.dingtalk.com/robot/send?access_token=env:DINGTALK_TOKEN"]},
    "config": {
        "sinks": [
            {
                "type": "loki",
                "name": "loki",
                "url": "http://loki:3100",
                "username": "tenant",
                "password": "file:/etc/eventrouter/secrets/loki-password",
            }
        ]
    },
    "credentials": {
        "values": {"loki-password": SECRET_VALUE, "dingtalk-token": SECRET_VALUE + "-dt"},
        "env": [{"name": "DINGTALK_TOKEN", "key": "dingtalk-token"}],
    },
}


def test_chart_created_secret_holds_the_credentials(chart: helm.Chart) -> None:
    docs = render(chart, SECRET_VALUES)
    secret = one(docs, "Secret", f"{FULLNAME}-credentials")
    decoded = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert decoded == SECRET_VALUES["credentials"]["values"]


def test_no_secret_value_outside_the_secret_object(chart: helm.Chart) -> None:
    rendered = render_text(chart, SECRET_VALUES)
    encoded = base64.b64encode(SECRET_VALUE.encode()).decode()
    docs = parse(rendered)
    others = [doc for doc in docs if doc["kind"] != "Secret"]
    assert len(others) == len(docs) - 1
    # Everything but the Secret: every other object, re-serialised, and the NOTES.
    texts = [yaml.safe_dump(doc) for doc in others]
    texts += [text for path, text in rendered.items() if path.endswith("NOTES.txt")]
    for text in texts:
        assert SECRET_VALUE not in text
        assert encoded[:16] not in text
    c = container(docs)
    assert not any(SECRET_VALUE in arg for arg in c["args"])
    assert all("value" not in e for e in c["env"]), "env values must come from valueFrom"


def test_credentials_mounted_as_files_and_env_from_secret_refs(chart: helm.Chart) -> None:
    docs = render(chart, SECRET_VALUES)
    secret_name = f"{FULLNAME}-credentials"
    assert volumes(docs)["credentials"]["secret"]["secretName"] == secret_name
    # Owner and group (fsGroup, which the router is in): 0400 left a root-owned file it cannot read.
    assert volumes(docs)["credentials"]["secret"]["defaultMode"] == 0o440
    assert pod_spec(docs)["securityContext"]["fsGroup"] == 65532
    # The whole Secret as a folder, no subPath: only so does the kubelet bring a rotated value into
    # the running pod, where the router re-reads its `file:` credentials (engine/reload.py).
    assert mounts(docs)["credentials"] == {
        "name": "credentials",
        "mountPath": "/etc/eventrouter/secrets",
        "readOnly": True,
    }
    env = {e["name"]: e["valueFrom"] for e in container(docs)["env"]}
    assert env["DINGTALK_TOKEN"] == {"secretKeyRef": {"name": secret_name, "key": "dingtalk-token"}}
    # A change of credentials rolls the pods.
    annotations = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert "checksum/credentials" in annotations


def test_existing_secret_is_mounted_and_not_created(chart: helm.Chart) -> None:
    values = {
        "credentials": {"existingSecret": "loki-auth", "env": [{"name": "LOKI_PASSWORD", "key": "password"}]},
        "config": {"sinks": [{"type": "loki", "url": "http://loki:3100", "password": "env:LOKI_PASSWORD"}]},
    }
    docs = render(chart, values)
    assert of_kind(docs, "Secret") == []
    assert volumes(docs)["credentials"]["secret"]["secretName"] == "loki-auth"
    env = {e["name"]: e["valueFrom"] for e in container(docs)["env"]}
    assert env["LOKI_PASSWORD"] == {"secretKeyRef": {"name": "loki-auth", "key": "password"}}


def test_existing_secret_and_chart_values_together_are_refused(chart: helm.Chart) -> None:
    values = {"credentials": {"existingSecret": "mine", "values": {"a": "b"}}}
    with pytest.raises(helm.HelmRenderError, match="not both"):
        render(chart, values)


@pytest.mark.parametrize(
    "values",
    [
        {"sinks": {"flags": ["dingtalk:https://oapi.dingtalk.com/robot/send?access_token=abc123"]}},
        {"sinks": {"flags": ["sls:https://cn-hangzhou.log.aliyuncs.com?access_key_secret=abc123"]}},
        {"config": {"sinks": [{"type": "loki", "url": "http://loki:3100", "password": "abc123"}]}},
        {"config": {"sinks": [{"type": "webhook", "url": "http://hook", "token": "abc123"}]}},
        {"sinks": {"flags": ["wecom:https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=abc123"]}},
        {
            "sinks": {
                "flags": ["dingtalk:https://oapi.dingtalk.com/robot/send?access_token=env:DT&sign=SECabc"]
            }
        },
        {
            "config": {
                "sinks": [
                    {"type": "dingtalk", "url": "https://oapi.dingtalk.com/robot/send?access_token=abc"}
                ]
            }
        },
    ],
    ids=[
        "flag-token",
        "flag-access-key-secret",
        "config-password",
        "config-token",
        "wecom-key",
        "dingtalk-sign",
        "config-url-query",
    ],
)
def test_literal_credential_is_refused(chart: helm.Chart, values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmRenderError, match="looks like a credential"):
        render(chart, values)


def test_a_literal_header_value_is_refused(chart: helm.Chart) -> None:
    sink = {"type": "webhook", "url": "http://hook", "headers": {"Authorization": "Bearer abc123"}}
    with pytest.raises(helm.HelmRenderError, match='header "Authorization" holds a literal value'):
        render(chart, {"config": {"sinks": [sink]}})
    sink["headers"] = {"Authorization": "file:/etc/eventrouter/secrets/hook-auth"}
    render(chart, {"config": {"sinks": [sink]}})


def test_a_pdb_of_max_unavailable_0_stays_0(chart: helm.Chart) -> None:
    values = {"podDisruptionBudget": {"enabled": True, "maxUnavailable": 0}}
    assert one(render(chart, values), "PodDisruptionBudget")["spec"]["maxUnavailable"] == 0
    values = {"podDisruptionBudget": {"enabled": True}}
    assert one(render(chart, values), "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


def test_the_metrics_service_name_fits_63_characters(chart: helm.Chart) -> None:
    docs = parse(
        chart.render({"metrics": {"service": {"enabled": True}}}, name="p" * 44, namespace=NAMESPACE)
    )
    (service,) = of_kind(docs, "Service")
    assert len(service["metadata"]["name"]) <= 63 and service["metadata"]["name"].endswith("-metrics")


# --- feature switches --------------------------------------------------------------------------


def test_leader_election_adds_only_a_lease_role(chart: helm.Chart) -> None:
    docs = render(chart, {"leaderElection": {"enabled": True, "leaseName": "er-lease"}})
    role = one(docs, "Role", f"{FULLNAME}-leader-election")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": ["er-lease"],
            "verbs": ["get", "update"],
        },
    ]
    binding = one(docs, "RoleBinding", f"{FULLNAME}-leader-election")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert bound_subjects(binding) == [("ServiceAccount", FULLNAME, NAMESPACE)]
    assert len(of_kind(docs, "Role")) == 1
    assert one(docs, "ClusterRole")["rules"] == [EVENTS_RULE]
    args = container(docs)["args"]
    for arg in (
        "--leader-elect",
        f"--leader-elect-namespace={NAMESPACE}",
        "--leader-elect-name=er-lease",
        "--leader-elect-lease-duration=15",
        "--leader-elect-renew-deadline=10",
        "--leader-elect-retry-period=2",
    ):
        assert arg in args
    assert one(docs, "Deployment")["spec"]["strategy"]["type"] == "RollingUpdate"


def test_leader_election_durations_must_be_ordered(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmRenderError, match="renewDeadline"):
        render(chart, {"leaderElection": {"enabled": True, "leaseDuration": 10, "renewDeadline": 10}})
    # client-go's rule, which the router applies too (it exited 2 on what the chart rendered).
    with pytest.raises(helm.HelmRenderError, match=r"more than 1\.2 × leaderElection\.retryPeriod"):
        render(chart, {"leaderElection": {"enabled": True, "renewDeadline": 2.2, "retryPeriod": 2}})
    # leaseDurationSeconds is an int32: the API server refuses more, and every replica stood by.
    with pytest.raises(helm.HelmValuesError, match="leaseDuration"):
        render(chart, {"leaderElection": {"enabled": True, "leaseDuration": 1e10}})


def test_two_replicas_without_leader_election_fail(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmRenderError, match=r"requires leaderElection\.enabled"):
        render(chart, {"replicaCount": 2})


def test_two_replicas_with_leader_election_render_spread_pods(chart: helm.Chart) -> None:
    docs = render(chart, VARIANTS["ha"])
    assert one(docs, "Deployment")["spec"]["replicas"] == 2
    anti = pod_spec(docs)["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"


def test_two_replicas_cannot_share_a_readwriteonce_volume(chart: helm.Chart) -> None:
    values = {"replicaCount": 2, "leaderElection": {"enabled": True}, "persistence": {"enabled": True}}
    with pytest.raises(helm.HelmRenderError, match="ReadWriteOnce"):
        render(chart, values)


def _bytes(quantity: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
    return int(quantity[:-2]) * units[quantity[-2:]] if quantity[-2:] in units else int(quantity)


def test_without_a_data_dir_tmp_has_room_for_a_sorted_relist_of_100k_events(chart: helm.Chart) -> None:
    """A relist sorted for Loki keeps the listed events' raw JSON in a temporary file until the list is
    complete: in /tmp when there is no data dir. The kubelet evicts a pod whose emptyDir outgrows its
    limit, and the old 64Mi held ~55,000 events of the recorded kind (~45,000 of the bench corpus's)."""
    sizes = [
        len(normalise(line["object"]).raw_json)
        for line in recorded_watch()
        if line["type"] in ("ADDED", "MODIFIED")
    ]
    mean = sum(sizes) / len(sizes)
    docs = render(chart, {"checkpoint": {"mode": "none"}})
    limit = _bytes(volumes(docs)["tmp"]["emptyDir"]["sizeLimit"])
    assert limit >= 100_000 * mean * 1.25, f"{limit} bytes for 100,000 events of {mean:.0f} bytes"
    # With a data dir (modes dataDir and configMap) the relist waits there; /tmp stays small.
    for mode in ("dataDir", "configMap"):
        assert (
            volumes(render(chart, {"checkpoint": {"mode": mode}}))["tmp"]["emptyDir"]["sizeLimit"] == "64Mi"
        )
    # An explicit limit is honoured.
    explicit = render(chart, {"checkpoint": {"mode": "none"}, "tmpSizeLimit": "3Gi"})
    assert volumes(explicit)["tmp"]["emptyDir"]["sizeLimit"] == "3Gi"


def test_configmap_checkpoint_adds_a_role_limited_to_that_configmap(chart: helm.Chart) -> None:
    docs = render(chart, {"checkpoint": {"mode": "configMap"}})
    name = f"{FULLNAME}-checkpoint"
    role = one(docs, "Role", name)
    assert role["metadata"]["namespace"] == NAMESPACE
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]},
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": [name],
            "verbs": ["get", "update", "patch"],
        },
    ]
    assert bound_subjects(one(docs, "RoleBinding", name)) == [("ServiceAccount", FULLNAME, NAMESPACE)]
    args = container(docs)["args"]
    assert f"--checkpoint-configmap={name}" in args
    # Each replica's own disk spool and dead letters stay in a data dir on an emptyDir, bounded to it.
    assert "--data-dir=/var/lib/eventrouter" in args and "--data-dir-max-bytes=1Gi" in args
    assert volumes(docs)["data"] == {"name": "data", "emptyDir": {"sizeLimit": "1Gi"}}
    assert mounts(docs)["data"]["mountPath"] == "/var/lib/eventrouter"
    # Mode none: no checkpoint and no data dir.
    bare = render(chart, {"checkpoint": {"mode": "none"}})
    assert not any(a.startswith(("--data-dir", "--checkpoint")) for a in container(bare)["args"])
    assert "data" not in volumes(bare) and "data" not in mounts(bare)
    assert one(docs, "ClusterRole")["rules"] == [EVENTS_RULE]


def test_watch_namespaces_gives_a_role_per_namespace_and_no_clusterrole(chart: helm.Chart) -> None:
    docs = render(chart, VARIANTS["namespaced"])
    assert of_kind(docs, "ClusterRole") == [] and of_kind(docs, "ClusterRoleBinding") == []
    roles = {r["metadata"]["namespace"]: r for r in of_kind(docs, "Role")}
    assert sorted(roles) == ["checkout", "payments"]
    for role in roles.values():
        assert role["rules"] == [EVENTS_RULE]
    bindings = {b["metadata"]["namespace"]: b for b in of_kind(docs, "RoleBinding")}
    assert sorted(bindings) == ["checkout", "payments"]
    for ns, binding in bindings.items():
        assert binding["roleRef"]["name"] == roles[ns]["metadata"]["name"]
        assert bound_subjects(binding) == [("ServiceAccount", FULLNAME, NAMESPACE)]
    args = container(docs)["args"]
    assert [a for a in args if a.startswith("--namespace=")] == [
        "--namespace=payments",
        "--namespace=checkout",
    ]
    assert "--cluster-name=prod-eu-1" in args


@pytest.mark.parametrize(
    ("key", "value", "instead"),
    [
        ("namespaces", ["a"], "watchNamespaces"),
        ("cluster_name", "x", "clusterName"),
        ("data_dir", "/d", "checkpoint"),
    ],
)
def test_config_keys_owned_by_chart_values_are_refused(
    chart: helm.Chart, key: str, value: Any, instead: str
) -> None:
    with pytest.raises(helm.HelmRenderError, match=instead):
        render(chart, {"config": {key: value, "sinks": [{"type": "stdout"}]}})


def test_persistence_renders_a_pvc_mounted_as_the_data_dir(chart: helm.Chart) -> None:
    docs = render(chart, {"persistence": {"enabled": True, "size": "5Gi", "storageClass": "fast"}})
    pvc = one(docs, "PersistentVolumeClaim", f"{FULLNAME}-data")
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "5Gi"
    assert pvc["spec"]["storageClassName"] == "fast"
    assert volumes(docs)["data"] == {
        "name": "data",
        "persistentVolumeClaim": {"claimName": f"{FULLNAME}-data"},
    }
    assert mounts(docs)["data"]["mountPath"] == "/var/lib/eventrouter"
    assert "--data-dir=/var/lib/eventrouter" in container(docs)["args"]
    assert "--data-dir-max-bytes=5Gi" in container(docs)["args"]


def test_persistence_with_an_existing_claim_creates_no_pvc(chart: helm.Chart) -> None:
    docs = render(chart, {"persistence": {"enabled": True, "existingClaim": "my-claim"}})
    assert of_kind(docs, "PersistentVolumeClaim") == []
    assert volumes(docs)["data"]["persistentVolumeClaim"] == {"claimName": "my-claim"}
    # Its size is not the chart's to know: the configured bounds apply.
    assert not any(a.startswith("--data-dir-max-bytes") for a in container(docs)["args"])


def test_service_monitor_scrapes_the_metrics_service(chart: helm.Chart) -> None:
    docs = render(chart, {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}})
    service = one(docs, "Service", f"{FULLNAME}-metrics")
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}
    ]
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    monitor = one(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


def test_metrics_service_alone(chart: helm.Chart) -> None:
    docs = render(chart, {"metrics": {"service": {"enabled": True}}})
    one(docs, "Service")
    assert of_kind(docs, "ServiceMonitor") == []


def test_pod_disruption_budget(chart: helm.Chart) -> None:
    docs = render(chart, VARIANTS["ha"])
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    spec = one(
        render(chart, {"podDisruptionBudget": {"enabled": True, "minAvailable": 1}}), "PodDisruptionBudget"
    )["spec"]
    assert spec["minAvailable"] == 1 and "maxUnavailable" not in spec


def test_grafana_dashboard_configmap_for_the_sidecar(chart: helm.Chart) -> None:
    values = {"grafanaDashboard": {"enabled": True, "annotations": {"grafana_folder": "Kubernetes"}}}
    docs = render(chart, values)
    dashboard = one(docs, "ConfigMap", f"{FULLNAME}-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "Kubernetes"}
    body = json.loads(dashboard["data"]["eventrouter-loki.json"])
    assert body == json.loads((CHART / "files" / "dashboard.json").read_text())
    # The sidecar cannot fill import-time `__inputs`: the data source must be a dashboard variable.
    assert "__inputs" not in body
    assert body["title"] and body["panels"]


def test_bundled_dashboard_is_the_examples_dashboard() -> None:
    example = CHART.parents[1] / "examples" / "grafana" / "eventrouter-loki-dashboard.json"
    assert json.loads((CHART / "files" / "dashboard.json").read_text()) == json.loads(example.read_text()), (
        "copy examples/grafana/eventrouter-loki-dashboard.json to charts/eventrouter/files/dashboard.json"
    )


def test_full_variant_renders_every_optional_object(chart: helm.Chart) -> None:
    kinds = {doc["kind"] for doc in render(chart, VARIANTS["full"])}
    assert kinds >= {"Secret", "PersistentVolumeClaim", "Service", "ServiceMonitor", "PodDisruptionBudget"}


def test_notes_summarise_the_install(chart: helm.Chart) -> None:
    notes = next(t for p, t in render_text(chart, VARIANTS["ha"]).items() if p.endswith("NOTES.txt"))
    assert "leader election" in notes
    assert f"ConfigMap {FULLNAME}-checkpoint" in notes
    assert "port-forward" in notes


# --- the router accepts what the chart renders ------------------------------------------------


def _run_parser_options() -> set[str]:
    from eventrouter import cli  # imported here so the chart tests do not depend on the router's code

    run = next(
        action
        for action in cli._parser()._actions
        if action.dest == "command" and action.choices is not None  # the subcommands
    )
    assert isinstance(run.choices, dict)
    return {opt for action in run.choices["run"]._actions for opt in action.option_strings}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_router_cli_parses_the_rendered_args(chart: helm.Chart, variant: str) -> None:
    args = container(render(chart, VARIANTS[variant]))["args"]
    flags = {arg.split("=", 1)[0] for arg in args[1:]}
    missing = flags - _run_parser_options()
    if missing:
        pytest.skip(f"the router CLI does not define {sorted(missing)} yet")
    from eventrouter import cli

    parsed = cli._parser().parse_args(args)
    assert parsed.command == "run"
    assert str(parsed.config) == "/etc/eventrouter/config.yaml"
    assert parsed.shutdown_timeout == 25


def test_router_check_accepts_the_rendered_config_and_sink_flags(chart: helm.Chart, tmp_path: Path) -> None:
    values = {"sinks": {"flags": ["stdout:?name=warnings&level=Warning&stream=stderr"]}}
    docs = render(chart, values)
    config = tmp_path / "config.yaml"
    config.write_text(one(docs, "ConfigMap")["data"]["config.yaml"])
    sink_args = [a for a in container(docs)["args"] if a.startswith("--sink=")]
    assert sink_args == ["--sink=stdout:?name=warnings&level=Warning&stream=stderr"]
    command = [sys.executable, "-c", "import sys; from eventrouter.cli import main; sys.exit(main())"]
    done = subprocess.run(
        [*command, "check", f"--config={config}", *sink_args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(line.split()[0] for line in done.stdout.splitlines() if line.strip()) == ["ok", "ok"]


def _readme_examples() -> dict[str, dict[str, Any]]:
    text = (CHART / "README.md").read_text()
    blocks = re.findall(r"^```yaml\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    assert blocks, "no yaml example in the chart's README"
    return {f"README.md example {i}": yaml.safe_load(block) for i, block in enumerate(blocks, 1)}


def _values_yaml_examples() -> dict[str, dict[str, Any]]:
    """The sinks values.yaml shows in comments, uncommented: its flags, and its config entry."""
    text = (CHART / "values.yaml").read_text()
    flags = re.findall(r'^ *# +- "([a-z]+:[^"]*)"$', text, flags=re.MULTILINE)
    entry = "\n".join(
        line[4:] for line in re.findall(r"^  # (?:- type: |  [a-z_]+: ).*$", text, re.MULTILINE)
    )
    assert flags and entry, "the commented examples of values.yaml moved: update this test"
    return {
        "values.yaml sinks.flags comment": {"sinks": {"flags": flags}},
        "values.yaml config comment": {"config": {"sinks": yaml.safe_load(entry)}},
    }


DOCUMENTED: dict[str, dict[str, Any]] = {
    "default": {},
    **{f"ci/{path.name}": ci_values(path.name) for path in sorted((CHART / "ci").glob("*.yaml"))},
    **_readme_examples(),
    **_values_yaml_examples(),
}


def _check_options() -> set[str]:
    from eventrouter import cli

    commands = next(a for a in cli._parser()._actions if a.dest == "command" and a.choices is not None)
    assert isinstance(commands.choices, dict)
    return {opt for action in commands.choices["check"]._actions for opt in action.option_strings}


@pytest.mark.parametrize("case", sorted(DOCUMENTED))
def test_router_check_accepts_every_documented_values_file(
    chart: helm.Chart, case: str, tmp_path: Path
) -> None:
    """The chart's own example, `loki:…?labels=cluster,namespace,reason` (README, ci/full-values.yaml,
    values.yaml), was refused by the router (Loki's `labels` are name=template; the built-in ones are
    `default_labels`), and so was values.yaml's Loki password without a username: `helm install`
    passed and the pod crash-looped. Each values file and example is rendered and its config and
    flags given to `eventrouter check --offline` (the sinks are not reachable from a test), with its
    Secret's keys as files and env vars; the flags `check` does not take are `run`'s own."""
    values = DOCUMENTED[case]
    docs = render(chart, values)
    c = container(docs)
    credentials = values.get("credentials", {})
    mount = credentials.get("mountPath", "/etc/eventrouter/secrets")
    given = credentials.get("values") or {}
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    config_map = next(d for d in of_kind(docs, "ConfigMap") if "config.yaml" in d.get("data", {}))
    config_text = config_map["data"]["config.yaml"].replace(mount, str(secrets))
    args = [a.replace(mount, str(secrets)) for a in c["args"][1:]]
    for key in re.findall(rf"file:{re.escape(str(secrets))}/([\w.-]+)", config_text + " ".join(args)):
        (secrets / key).write_text(given.get(key, "example-value") + "\n")  # as `echo value | base64`
    env = {
        e["name"]: given.get(e["valueFrom"]["secretKeyRef"]["key"], "example-value") + "\n"
        for e in c.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    config = tmp_path / "config.yaml"
    config.write_text(config_text)
    local = {"--config": str(config), "--data-dir": str(tmp_path / "data")}
    options = _check_options()
    check_args = [
        f"{flag}={local[flag]}" if flag in local else arg
        for arg in args
        if (flag := arg.split("=", 1)[0]) in options
    ]
    assert f"--config={config}" in check_args
    done = subprocess.run(
        [sys.executable, "-m", "eventrouter.cli", "check", "--offline", *check_args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **env},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    sinks = len(yaml.safe_load(config_text).get("sinks") or []) + sum(a.startswith("--sink=") for a in args)
    lines = done.stdout.splitlines()
    assert len(lines) == sinks > 0 and all(line.startswith("valid ") for line in lines), done.stdout
