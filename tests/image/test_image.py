"""The container image, built from ./Dockerfile by `bash scripts/image-test.sh` (buildah, no Docker
engine) and run with podman the way the chart's Deployment runs it.

Marked `image` and left out of the default test run: building needs root, buildah and podman,
which scripts/image-test.sh installs. Without EVENTROUTER_IMAGE these tests fail, never skip.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import json
import os
import re
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from importlib.metadata import distribution
from pathlib import Path
from typing import Any

import aiohttp
import helm_python as helm
import pytest
import yaml
from packaging.utils import canonicalize_name

import eventrouter.testing
from eventrouter.record import occurrence_number
from eventrouter.testing import event_object, recorded_watch
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.receivers.everything import destinations
from eventrouter.testing.receivers.loki import LokiReceiver
from eventrouter.testing.receivers.osmem import OsmemServer, osmem_fixture_server
from eventrouter.testing.receivers.webhook import WebhookReceiver
from eventrouter.testing.tls import self_signed
from eventrouter.testing.waiting import until

pytestmark = pytest.mark.image

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "eventrouter"
UID = 65532
SA_TOKEN = "image-test-token"
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


@pytest.fixture(scope="module")
def image() -> str:
    name = os.environ.get("EVENTROUTER_IMAGE")
    if not name:
        pytest.fail("EVENTROUTER_IMAGE is not set: build the image and run these with scripts/image-test.sh")
    return name


def _cgroup_hybrid() -> bool:
    return os.path.ismount("/sys/fs/cgroup/unified")


def podman(*args: str) -> list[str]:
    """The podman command line. crun refuses hosts that mount cgroup v1 and v2 side by side
    ("hybrid", as this sandbox does): in a mount namespace of its own without the v2 mount, the
    host is plain v1 to it."""
    if _cgroup_hybrid():
        return [
            "unshare",
            "-m",
            "sh",
            "-c",
            'umount /sys/fs/cgroup/unified && exec podman "$@"',
            "podman",
            *args,
        ]
    return ["podman", *args]


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(podman(*args), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"podman {' '.join(args)} exited {done.returncode}: {done.stderr[-2000:]}"
    return done


def inspect(ref: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(run("image", "inspect", ref).stdout)[0]
    return doc


async def stop_container(name: str, grace: int = 30) -> None:
    """As the kubelet stops a pod: SIGTERM to PID 1, SIGKILL after ``grace`` seconds."""
    stop = await asyncio.create_subprocess_exec(*podman("stop", "--time", str(grace), name))
    assert await asyncio.wait_for(stop.wait(), grace + 30) == 0


@pytest.fixture
def containers() -> Iterator[list[str]]:
    """Names of the containers a test starts: whatever still runs at its end is removed, so a failed
    test leaves none behind."""
    names: list[str] = []
    yield names
    for name in names:
        subprocess.run(podman("rm", "--force", "--time", "0", name), capture_output=True, timeout=60)


# --- what the image is ----------------------------------------------------------------------------


def test_the_image_runs_eventrouter_as_65532_and_carries_its_labels(image: str) -> None:
    config = inspect(image)["Config"]
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["eventrouter"]  # exec form: the router is PID 1 and gets SIGTERM
    assert config["Cmd"][0] == "run"
    assert "8080/tcp" in config["ExposedPorts"]
    assert config["WorkingDir"] == "/var/lib/eventrouter"
    assert "PYTHONDONTWRITEBYTECODE=1" in config["Env"]
    labels = config["Labels"]
    assert labels["org.opencontainers.image.title"] == "eventrouter"
    assert labels["org.opencontainers.image.version"] == distribution("eventrouter").version
    for key in ("description", "source", "licenses", "revision"):
        assert labels[f"org.opencontainers.image.{key}"]


CONTENTS = """\
import hashlib, importlib.metadata as md, importlib.util, json, os, pathlib, shutil, sys
from packaging.requirements import Requirement
eps = md.entry_points(group="eventrouter.sinks")
loaded = {ep.name: ep.load().__module__ for ep in eps}  # every built-in sink imports
extras = [e for e in md.metadata("eventrouter").get_all("Provides-Extra") if e != "test"]
def wanted(r):
    return r.marker is None or any(r.marker.evaluate({"extra": e}) for e in extras)
def missing(name):
    try:
        md.version(name)
    except md.PackageNotFoundError:
        return True
    return False
reqs = [Requirement(r) for r in md.requires("eventrouter")]
print(json.dumps({
    "sinks": sorted(loaded),
    "extras": sorted(extras),
    "missing": sorted(r.name for r in reqs if wanted(r) and r.name != "eventrouter" and missing(r.name)),
    "version": md.version("eventrouter"),
    "installed": sorted(f"{d.metadata['Name']}=={d.version}" for d in md.distributions()),
    "package": os.path.dirname(importlib.util.find_spec("eventrouter").origin),
    "pip": [m for m in ("pip", "setuptools", "wheel") if importlib.util.find_spec(m)],
    "tools": [t for t in ("pip", "pip3", "gcc", "cc", "make", "git") if shutil.which(t)],
    "leftovers": [p for p in ("/src", "/wheels", "/root/.cache") if os.path.exists(p)],
    "uid": os.getuid(),
    "root_writable": os.access("/", os.W_OK),
    "sources": {
        f"{pkg}/{p.relative_to(base).as_posix()}": hashlib.sha256(p.read_bytes()).hexdigest()
        for pkg, base in ((pkg, pathlib.Path(importlib.util.find_spec(pkg).origin).parent)
                          for pkg in ("eventrouter", "eventrouter_sinks"))
        for p in sorted(base.rglob("*.py"))
    },
}))
"""


def test_the_image_holds_every_built_in_sink_and_no_build_tools(image: str) -> None:
    done = run("run", "--rm", "--network", "none", "--entrypoint", "python", image, "-c", CONTENTS)
    got = json.loads(done.stdout)
    here = sorted(
        ep.name for ep in distribution("eventrouter").entry_points if ep.group == "eventrouter.sinks"
    )
    assert got["sinks"] == here and {"loki", "kafka", "elasticsearch", "sls", "webhook"} <= set(here)
    assert got["version"] == distribution("eventrouter").version
    # Every dependency of every extra but the tests' (kafka, elasticsearch, all) is installed.
    assert "kafka" in got["extras"] and "elasticsearch" in got["extras"]
    assert got["missing"] == []
    # Exactly the versions scripts/image-lock.sh pinned, and nothing else besides eventrouter.
    pinned = [
        line for line in (ROOT / "image-constraints.txt").read_text().splitlines() if line and line[0] != "#"
    ]
    installed = {canonicalize_name(n): v for n, _, v in (x.partition("==") for x in got["installed"])}
    assert installed.pop(canonicalize_name("eventrouter")) == got["version"]
    assert installed == {canonicalize_name(n): v for n, _, v in (x.partition("==") for x in pinned)}
    # Built from this working tree, not a cached layer of an earlier build.
    here_sources = {
        f"{pkg}/{p.relative_to(base).as_posix()}": hashlib.sha256(p.read_bytes()).hexdigest()
        for pkg, base in (("eventrouter", ROOT / "eventrouter"), ("eventrouter_sinks", ROOT / "sinks"))
        for p in sorted(base.rglob("*.py"))
        if "__pycache__" not in p.parts
    }
    assert got["sources"] == here_sources, "the image holds other sources than this tree: rebuild it"
    # Installed from the wheel into site-packages, not a copy of the source tree.
    assert got["package"].endswith("/site-packages/eventrouter")
    assert got["pip"] == [] and got["tools"] == [] and got["leftovers"] == []
    assert got["uid"] == UID and got["root_writable"] is False
    listing = run("run", "--rm", "--network", "none", image, "sinks").stdout
    listed = sorted(re.findall(r"^(\S+) +\(eventrouter ", listing, re.MULTILINE))
    assert listed == here, "`eventrouter sinks` in the image lists another set"


def test_the_final_stage_adds_little_beyond_the_python_base(image: str) -> None:
    """Multi-stage: wheels and the source tree stay in the builder; the image adds one layer of
    installed packages on top of its base."""
    ours, base = inspect(image), inspect(os.environ.get("PYTHON_IMAGE", "python:3.11-slim"))
    added = ours["RootFS"]["Layers"][len(base["RootFS"]["Layers"]) :]
    assert ours["RootFS"]["Layers"][: len(base["RootFS"]["Layers"])] == base["RootFS"]["Layers"]
    assert len(added) == 1
    added_mib = (ours["Size"] - base["Size"]) / 2**20
    # Measured 102 MiB in session 14, of which kubernetes-asyncio 48 and elasticsearch 12.
    assert added_mib < 130, f"the image adds {added_mib:.0f} MiB to its base"


# --- the image run as the chart runs it --------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def render_chart(values: dict[str, Any]) -> dict[str, Any]:
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values, name="er", namespace="monitoring")
    docs = [
        d for path, text in rendered.items() if path.endswith(".yaml") for d in yaml.safe_load_all(text) if d
    ]
    return {d["kind"]: d for d in docs if d["kind"] in ("Deployment", "ConfigMap", "Secret")}


class Pod:
    """One pod of the chart's Deployment, run by podman with the pod's security context, volumes,
    service account and environment translated one for one. Each pod gets the chart rendered with
    a metrics port of its own: they share the host's network, where a cluster gives each pod its own."""

    def __init__(
        self, image: str, api: FakeApiServer, ca: Path, tmp: Path, values: dict[str, Any], name: str = "er-0"
    ) -> None:
        self.image, self.tmp = image, tmp / name
        self.tmp.mkdir()
        self.pod_name = name
        # The pod's metadata.uid: a container restarted in this pod keeps it, as the kubelet's does.
        self.pod_uid = f"uid-{name}-{os.getpid()}"
        self.name = f"eventrouter-image-test-{os.getpid()}-{name}"
        self.metrics_port = free_port()
        objs = render_chart({**values, "metrics": {"port": self.metrics_port}})
        spec = objs["Deployment"]["spec"]["template"]["spec"]
        (self.container,) = spec["containers"]
        self.volumes = {v["name"]: v for v in spec["volumes"]}
        self.fs_group = int(spec["securityContext"]["fsGroup"])
        self.grace = int(spec["terminationGracePeriodSeconds"])
        self.config_map = objs["ConfigMap"]
        self.secret_name = objs.get("Secret", {}).get("metadata", {}).get("name")
        self.secret = {k: base64.b64decode(v) for k, v in objs.get("Secret", {}).get("data", {}).items()}
        sa = self.tmp / "serviceaccount"
        sa.mkdir()
        (sa / "token").write_text(SA_TOKEN)
        (sa / "ca.crt").write_bytes(ca.read_bytes())
        (sa / "namespace").write_text("monitoring")
        for f in sa.iterdir():
            f.chmod(0o644)  # as Kubernetes projects them: readable by the pod's user
        self.api_port = api.url.rsplit(":", 1)[1]
        self.log = self.tmp / "container.log"
        self.proc: asyncio.subprocess.Process | None = None

    def dir(self, volume: str) -> Path:
        """The host directory behind one of the pod's volumes (emptyDir or Secret)."""
        return self.tmp / "volumes" / volume

    def security_flags(self) -> list[str]:
        sc = self.container["securityContext"]
        # Every field of the chart's security context is translated; a new one must be added here.
        assert sorted(sc) == [
            "allowPrivilegeEscalation", "capabilities", "readOnlyRootFilesystem", "runAsGroup",
            "runAsNonRoot", "runAsUser", "seccompProfile",
        ]  # fmt: skip
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}  # podman's default profile
        flags = ["--user", f"{sc['runAsUser']}:{sc['runAsGroup']}"]
        flags += ["--cap-drop", ",".join(sc["capabilities"]["drop"])]
        if sc["readOnlyRootFilesystem"]:
            flags += ["--read-only", "--read-only-tmpfs=false"]  # only what the pod mounts is writable
        if not sc["allowPrivilegeEscalation"]:
            flags += ["--security-opt", "no-new-privileges"]
        return flags

    def mount_flags(self) -> list[str]:
        flags = ["-v", f"{self.tmp / 'serviceaccount'}:{SA_DIR}:ro"]
        for mount in self.container["volumeMounts"]:
            volume, target = self.volumes[mount["name"]], mount["mountPath"]
            if "configMap" in volume:
                assert volume["configMap"]["name"] == self.config_map["metadata"]["name"]
                key = mount["subPath"]
                source = self.tmp / key
                source.write_text(self.config_map["data"][key])
                source.chmod(0o644)
                flags += ["-v", f"{source}:{target}:ro"]
            elif "secret" in volume:
                # The kubelet writes one file per key, owned by root with the group fsGroup, and adds
                # group read to defaultMode (read-only volumes): the router reads them by its group.
                assert volume["secret"]["secretName"] == self.secret_name
                source = self.dir(mount["name"])
                source.mkdir(parents=True, exist_ok=True)
                for key, value in self.secret.items():
                    (source / key).write_bytes(value)
                    (source / key).chmod(volume["secret"]["defaultMode"] | 0o440)
                    os.chown(source / key, 0, self.fs_group)
                flags += ["-v", f"{source}:{target}:ro"]
            elif "emptyDir" in volume and target == "/tmp":
                size = volume["emptyDir"].get("sizeLimit", "64Mi").removesuffix("i").lower()
                flags += ["--tmpfs", f"{target}:rw,size={size},mode=1777"]
            elif "emptyDir" in volume:
                source = self.dir(mount["name"])
                source.mkdir(parents=True, exist_ok=True)
                os.chown(source, UID, self.fs_group)  # what fsGroup does to the volume
                flags += ["-v", f"{source}:{target}:rw"]
            else:
                raise AssertionError(f"volume {mount['name']}: {sorted(volume)} is not translated here")
        return flags

    def env_flags(self) -> list[str]:
        fields = {
            "metadata.name": self.pod_name,
            "metadata.namespace": "monitoring",
            "metadata.uid": self.pod_uid,
        }
        flags = []
        for var in self.container["env"]:
            source = var.get("valueFrom", {})
            if "value" in var:
                value = var["value"]
            elif "fieldRef" in source:
                value = fields[source["fieldRef"]["fieldPath"]]
            else:
                value = self.secret[source["secretKeyRef"]["key"]].decode()
            flags += ["-e", f"{var['name']}={value}"]
        # What the kubelet gives every pod: the API server's address.
        return [
            *flags,
            "-e",
            "KUBERNETES_SERVICE_HOST=127.0.0.1",
            "-e",
            f"KUBERNETES_SERVICE_PORT={self.api_port}",
        ]

    async def start(self) -> None:
        cmd = podman(
            "run", "--rm", "--name", self.name, "--network", "host", "--stop-timeout", str(self.grace),
            *self.security_flags(), *self.mount_flags(), *self.env_flags(),
            self.image, *self.container["args"],
        )  # fmt: skip
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(*cmd, stdout=log, stderr=log)

    async def get(self, path: str) -> tuple[int, str]:
        try:
            async with (
                aiohttp.ClientSession() as http,
                http.get(
                    f"http://127.0.0.1:{self.metrics_port}{path}", timeout=aiohttp.ClientTimeout(5)
                ) as resp,
            ):
                return resp.status, await resp.text()
        except aiohttp.ClientError:
            return 0, ""

    async def probe(self, kind: str) -> int:
        """The chart's livenessProbe or readinessProbe, as the kubelet sends it: the HTTP status."""
        get = self.container[kind]["httpGet"]
        ports = {p["name"]: p["containerPort"] for p in self.container["ports"]}
        assert ports[get["port"]] == self.metrics_port
        return (await self.get(get["path"]))[0]

    async def until_ready(self, timeout: float = 60) -> None:
        assert self.proc is not None
        async with asyncio.timeout(timeout):
            while await self.probe("readinessProbe") != 200:  # another process: polling, no event
                if self.proc.returncode is not None:
                    raise AssertionError(
                        f"the container exited {self.proc.returncode}: {self.log.read_text()[-2000:]}"
                    )
                await asyncio.sleep(0.1)

    async def stop(self) -> int:
        """As the kubelet stops a pod, within the chart's grace period: the container's exit code."""
        assert self.proc is not None
        await stop_container(self.name, self.grace)
        return await asyncio.wait_for(self.proc.wait(), 30)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[tuple[FakeApiServer, Path]]:
    ca, server_tls = await self_signed(tmp_path)
    async with FakeApiServer(token=SA_TOKEN, ssl_context=server_tls) as api:
        api.bookmark_interval = 0.5
        yield api, ca


HOOK_SECRET = "image-test-hmac-S3cret"
HOOK_TOKEN = "image-test-bearer-T0ken"


@pytest.fixture
async def hook() -> AsyncIterator[WebhookReceiver]:
    async with WebhookReceiver(secret=HOOK_SECRET) as receiver:
        yield receiver


@pytest.fixture
def pod_factory(containers: list[str]) -> Iterator[list[Pod]]:
    pods: list[Pod] = []
    yield pods
    containers.extend(pod.name for pod in pods)  # removed by `containers` at the end


def received(hook: WebhookReceiver) -> collections.Counter[tuple[str, int]]:
    return collections.Counter((r["uid"], r["occurrence"]) for req in hook.accepted for r in req.json())


def metric(text: str, name: str, sink: str) -> float:
    prefix = f'{name}{{sink="{sink}"}} '
    return sum(float(line.removeprefix(prefix)) for line in text.splitlines() if line.startswith(prefix))


async def test_the_chart_s_pod_delivers_the_recorded_traffic_and_restarts_without_duplicates(
    image: str,
    cluster: tuple[FakeApiServer, Path],
    hook: WebhookReceiver,
    tmp_path: Path,
    pod_factory: list[Pod],
) -> None:
    """Read-only root, user 65532, no capabilities, in-cluster service account over TLS, the config
    from the chart's ConfigMap and the data dir on a volume: every recorded occurrence arrives;
    `podman stop` drains and exits 0; a restart on the same data dir delivers nothing twice."""
    api, ca = cluster
    # Credentials as the chart documents them: a Secret it creates, one key read as a file, one as env.
    webhook = {
        "type": "webhook", "name": "hook", "url": hook.url, "batch_max_wait": 0.05,
        "secret": "file:/etc/eventrouter/secrets/hook-secret", "bearer_token": "env:HOOK_TOKEN",
    }  # fmt: skip
    values = {
        "config": {"sinks": [webhook]},
        "credentials": {
            "values": {"hook-secret": HOOK_SECRET, "hook-token": HOOK_TOKEN},
            "env": [{"name": "HOOK_TOKEN", "key": "hook-token"}],
        },
    }
    pod = Pod(image, api, ca, tmp_path, values)
    pod_factory.append(pod)
    await pod.start()
    await pod.until_ready()
    recording = recorded_watch()
    await api.load_recording(recording)
    # Every occurrence the recording went through, repeats included, not only the final counts.
    want = {
        (e["object"]["metadata"]["uid"], occurrence_number(e["object"]))
        for e in recording
        if e["type"] != "DELETED"
    }
    assert len(want) == 126
    await until(lambda: set(received(hook)) >= want, timeout=60)
    status, text = await pod.get("/metrics")
    assert status == 200 and metric(text, "eventrouter_sink_delivered_total", "hook") == 126
    assert await pod.probe("livenessProbe") == 200
    # The credentials arrived: every request signed with the file's secret and sent with the env token.
    assert all(r.signature_ok for r in hook.accepted)
    assert {r.headers["Authorization"] for r in hook.accepted} == {f"Bearer {HOOK_TOKEN}"}
    assert HOOK_SECRET not in pod.log.read_text() and HOOK_TOKEN not in pod.log.read_text()
    assert await pod.stop() == 0
    log = pod.log.read_text()
    assert "stopped after draining" in log, log[-3000:]
    assert list(pod.dir("data").iterdir()), "nothing written to the data dir"

    # While the pod is gone: new events and a repeat of an old one.
    for i in range(5):
        api.create_event(event_object(object_name=f"after-{i}"))
    old = next(e["metadata"] for e in api.events() if not e["metadata"]["name"].startswith("after-"))
    api.bump(old["namespace"], old["name"])
    new = {(e["metadata"]["uid"], occurrence_number(e)) for e in api.events()} - want
    assert len(new) == 6
    want |= new
    await pod.start()
    await until(lambda: set(received(hook)) >= want, timeout=60)
    # Delivered by the new container: exactly what is new, so nothing old was sent again.
    await pod.until_ready()
    status, text = await pod.get("/metrics")
    assert metric(text, "eventrouter_sink_delivered_total", "hook") == len(new)
    assert await pod.stop() == 0
    got = received(hook)
    assert set(got) == want
    assert [k for k, n in got.items() if n > 1] == [], "duplicates after a clean restart"


def lines_of(path: Path) -> list[tuple[str, int]]:
    """(uid, occurrence) of each complete line; a write cut by SIGKILL leaves at most a fragment."""
    if not path.exists():
        return []
    text = path.read_bytes()
    rows = []
    for line in text[: text.rfind(b"\n") + 1].splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        rows.append((doc["uid"], doc["occurrence"]))
    return rows


def lease_holder(api: FakeApiServer, name: str) -> str | None:
    """The pod holding the lease (its identity is the pod's name, "_", its uid)."""
    try:
        lease = api.get_object("leases", "monitoring", name)
    except Exception:
        return None
    identity = (lease.get("spec") or {}).get("holderIdentity") or ""
    return identity.split("_", 1)[0] or None


async def test_the_chart_s_two_replicas_hand_over_without_losing_anything_when_the_leader_is_killed(
    image: str, cluster: tuple[FakeApiServer, Path], tmp_path: Path, pod_factory: list[Pod]
) -> None:
    """replicaCount 2 with leader election and the checkpoint in a ConfigMap, as documented: only the
    leader delivers; SIGKILL it under load and the standby takes over the Lease, resumes from the
    checkpoint and loses nothing; duplicates stay within what the dead leader had not checkpointed."""
    api, ca = cluster
    values = {
        "replicaCount": 2,
        "leaderElection": {"enabled": True, "leaseDuration": 3, "renewDeadline": 2, "retryPeriod": 0.3},
        "checkpoint": {"mode": "configMap"},
        # Each pod writes to a volume of its own, so the test can tell who delivered what.
        "config": {
            "sinks": [
                {
                    "type": "file",
                    "name": "out",
                    "path": "/out/events.jsonl",
                    "batch_max_events": 20,
                    "batch_max_wait": 0.05,
                }
            ]
        },
        "extraVolumes": [{"name": "out", "emptyDir": {}}],
        "extraVolumeMounts": [{"name": "out", "mountPath": "/out"}],
    }
    a, b = (Pod(image, api, ca, tmp_path, values, name=n) for n in ("er-a", "er-b"))
    pod_factory.extend([a, b])
    args = dict(arg.split("=", 1) for arg in a.container["args"] if "=" in arg)
    lease, checkpoint = args["--leader-elect-name"], args["--checkpoint-configmap"]

    def delivered(pod: Pod) -> list[tuple[str, int]]:
        return lines_of(pod.dir("out") / "events.jsonl")

    def checkpoint_version() -> str | None:
        try:
            return str(api.get_object("configmaps", "monitoring", checkpoint)["metadata"]["resourceVersion"])
        except Exception:
            return None

    for i in range(50):
        api.create_event(event_object(object_name=f"before-{i}"))
    await a.start()
    await until(lambda: lease_holder(api, lease) == "er-a", timeout=60)
    await b.start()
    await until(lambda: len(delivered(a)) >= 50, timeout=30)
    async with api.steady_events():
        await until(lambda: len(delivered(a)) >= 100, timeout=30)
        await b.until_ready()  # a standby is ready (it serves /metrics) but delivers nothing
        assert delivered(b) == []
        written = checkpoint_version()
        await until(lambda: checkpoint_version() not in (None, written), timeout=30)
        run("kill", "--signal", "KILL", a.name)
        assert a.proc is not None and await asyncio.wait_for(a.proc.wait(), 30) != 0
        await until(lambda: lease_holder(api, lease) == "er-b", timeout=30)
        await until(lambda: len(delivered(b)) >= 20, timeout=30)
    want = {(e["metadata"]["uid"], occurrence_number(e)) for e in api.events()}
    await until(lambda: want <= set(delivered(a)) | set(delivered(b)), timeout=60)
    assert await b.stop() == 0
    both = collections.Counter(delivered(a)) + collections.Counter(delivered(b))
    dup = sum(n - 1 for n in both.values())
    print(f"expected={len(want)} a={len(delivered(a))} b={len(delivered(b))} duplicates={dup}")
    assert want <= set(both), "lost occurrences"
    # At most what a delivered since its last checkpoint write (every second; ~100/s here) and its
    # in-flight batch come again from b; the checkpoint it wrote was honoured.
    assert dup <= 2 * 100 + 20
    assert dup < len(delivered(a))


# --- every built-in sink, from inside the image -------------------------------------------------------


@pytest.fixture(scope="module")
def osmem_server() -> Iterator[OsmemServer]:
    yield from osmem_fixture_server()


async def test_every_built_in_sink_delivers_the_recorded_traffic_from_the_image(
    image: str, osmem_clone: Any, tmp_path: Path
) -> None:
    """`eventrouter replay` in the image, read-only root, no capabilities: the recording reaches the
    Loki, Kafka, Elasticsearch, SLS, webhook and file destinations once per occurrence, so every
    sink's client library and native extension (cramjam, orjson, aiokafka, the ES transport) works
    there, not only imports."""
    recording = Path(eventrouter.testing.__file__).parent / "data" / "watch-core-v1.jsonl"
    out = tmp_path / "out"
    out.mkdir()
    os.chown(out, UID, UID)
    async with destinations(osmem_clone.url) as dest:
        cmd = podman(
            "run", "--rm", "--network", "host", "--read-only", "--read-only-tmpfs=false",
            "--tmpfs", "/tmp:rw,size=64m,mode=1777", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            "-v", f"{recording}:/data/watch.jsonl:ro", "-v", f"{out}:/out:rw",
            image, "replay", "/data/watch.jsonl", "--cluster-name", "e2e",
            *[f"--sink={f}" for f in dest.flags("/out/events.jsonl")],
        )  # fmt: skip
        # Not subprocess.run: the receivers answer from this event loop while the container sends.
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        _, stderr = await asyncio.wait_for(proc.communicate(), 180)
        assert proc.returncode == 0, stderr.decode()[-3000:]
        summary = json.loads(stderr.splitlines()[-1])
        assert summary["occurrences"] == 126 and summary["malformed"] == 0
        assert {name: row["delivered"] for name, row in summary["sinks"].items()} == dict.fromkeys(
            ["loki", "kafka", "elasticsearch", "sls", "webhook", "file"], 126
        )
        # And as each destination saw it.
        seen = await dest.received(out / "events.jsonl", 126)
        for name, keys in seen.items():
            assert len(keys) == len(set(keys)) == 126, (
                f"{name}: {len(keys)} received, {len(set(keys))} distinct"
            )


def test_a_data_dir_without_its_volume_is_a_configuration_error(image: str) -> None:
    """--data-dir on the image's read-only root, the volume forgotten: exit 2 naming the directory,
    no traceback, before anything is watched."""
    cmd = podman(
        "run", "--rm", "--network", "none", "--read-only", "--tmpfs", "/tmp:rw,size=64m,mode=1777",
        image, "run", "--demo", "--metrics-addr", "127.0.0.1:0", "--data-dir", "/var/lib/eventrouter",
    )  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "--data-dir /var/lib/eventrouter: cannot write there (Read-only file system)" in done.stderr
    assert "Traceback" not in done.stderr


async def test_the_demo_runs_in_the_image_as_any_user_on_a_read_only_root(
    image: str, containers: list[str]
) -> None:
    """The README's demo in the image, as a platform that assigns a random uid in group 0 runs it
    (OpenShift), on a read-only root with a writable /tmp: every recorded occurrence is printed and
    the router says why it writes no file."""
    name = f"eventrouter-image-test-{os.getpid()}-demo"
    containers.append(name)
    cmd = podman(
        "run", "--rm", "--name", name, "--network", "none", "--user", "1000700000:0",
        "--read-only", "--read-only-tmpfs=false", "--tmpfs", "/tmp:rw,size=64m,mode=1777",
        image, "run", "--demo", "--metrics-addr", "127.0.0.1:0",
    )  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    lines = [await asyncio.wait_for(proc.stdout.readline(), 60) for _ in range(126)]
    await stop_container(name)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()[-2000:]
    records = [json.loads(line) for line in lines]
    assert len({(r["uid"], r["occurrence"]) for r in records}) == 126
    assert "writing to stdout only" in err.decode()


async def test_a_relist_with_nowhere_to_write_sorts_in_memory_and_delivers_everything(
    image: str, tmp_path: Path, containers: list[str]
) -> None:
    """`docker run --read-only` with no tmpfs and no --data-dir: a Loki sink asks for the relist
    oldest-first, which waits in a temporary file beyond 500 events, and no directory at all is
    writable. The relist sorts in memory instead, says so, and Loki gets every event."""
    name = f"eventrouter-image-test-{os.getpid()}-readonly"
    containers.append(name)
    async with FakeApiServer(token="t0ken") as api, LokiReceiver() as loki:
        for i in range(700):
            api.create_event(event_object(object_name=f"pod-{i}"))
        kubeconfig = Path(api.kubeconfig(tmp_path / "kubeconfig"))
        kubeconfig.chmod(0o644)
        log = tmp_path / "container.log"
        cmd = podman(
            "run", "--rm", "--name", name, "--network", "host", "--read-only", "--read-only-tmpfs=false",
            "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "-v", f"{kubeconfig}:/kube/config:ro",
            image, "run", "--kubeconfig", "/kube/config", "--metrics-addr", "127.0.0.1:0",
            f"--sink=loki:{loki.url}?batch_max_wait=0.05",
        )  # fmt: skip
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(*cmd, stdout=out, stderr=out)

        def lines() -> int:
            return sum(len(stream.values) for stream in loki.query_range())

        await until(lambda: lines() >= 700 or proc.returncode is not None, timeout=90)
        await stop_container(name)
        assert await asyncio.wait_for(proc.wait(), 60) == 0, log.read_text()[-3000:]
        text = log.read_text()
        assert "cannot use a temporary file in the temp dir (" in text, text[-3000:]
        assert lines() == 700
