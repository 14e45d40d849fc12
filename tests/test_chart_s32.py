"""The chart (rendered by Helm's own engine, helm-python-sdk) against session 32's operator review:
F1, the README's dead-letter loop run against a render; F2, a number as a CPU or memory quantity;
F3, mount paths of the values that collide with the chart's own."""

from __future__ import annotations

import asyncio
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
from chart_helpers import CHART, Doc, docs
from chart_helpers import render as render_text

from eventrouter.engine.deadletter import DeadLetter
from eventrouter.source.tracker import OccurrenceTracker
from eventrouter.testing import event_object
from eventrouter.testing.receivers.webhook import WebhookReceiver


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: helm.Chart, values: dict[str, Any]) -> list[Doc]:
    return docs(render_text(chart, values))


def _one(docs: list[Doc], kind: str) -> Doc:
    (found,) = [doc for doc in docs if doc["kind"] == kind]
    return found


def _container(docs: list[Doc]) -> Doc:
    (found,) = _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return dict(found)


# --- F1: the README's dead-letter loop -----------------------------------------------------------


def _readme_loop() -> str:
    """The script the chart README's "Dead letters" section runs in the pod (`sh -c '…'`)."""
    text = (CHART / "README.md").read_text()
    section = text[text.index("## Dead letters") :]
    block = re.search(r"```sh\n(.*?)```", section, flags=re.DOTALL)
    assert block is not None
    script = re.search(r"sh -c '(.*?)'\n", block[1], flags=re.DOTALL)
    assert script is not None, block[1]
    return script[1]


def _pod_files(docs: list[Doc], root: Path) -> dict[str, Path]:
    """Each mount of the rendered container, as a local path: a ConfigMap key (subPath) written to a
    file as the kubelet projects it, any other volume a folder."""
    config_map = _one(docs, "ConfigMap")
    volumes = {v["name"]: v for v in _one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    local: dict[str, Path] = {}
    for n, mount in enumerate(_container(docs)["volumeMounts"]):
        path = root / f"mount{n}"
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            assert volume["configMap"]["name"] == config_map["metadata"]["name"]
            items = {i["path"]: i["key"] for i in volume["configMap"].get("items", [])}
            key = items.get(mount["subPath"], mount["subPath"])
            path.write_text(config_map["data"][key])
        else:
            path.mkdir()
        local[mount["mountPath"]] = path
    return local


def _letters(folder: Path, sink: str, count: int) -> list[str]:
    tracker = OccurrenceTracker(cluster="c", exact=True)
    occs = []
    for i in range(count):
        obj = event_object(uid=f"u{i}", count=1, object_name=f"p{i}")
        obj["lastTimestamp"] = f"2024-05-01T10:00:{i:02d}Z"
        occ = tracker.observe(obj)
        assert occ is not None
        occs.append(occ)
    assert DeadLetter(folder / f"{sink}.jsonl", sink=sink).write(
        [(occ, "webhook answered 400") for occ in occs]
    )
    return [occ.key for occ in occs]


@pytest.mark.parametrize("given", ["sinks.flags", "extraArgs"])
async def test_the_readmes_dead_letter_loop_sends_a_flag_sinks_letters_to_that_sink(
    chart: helm.Chart, tmp_path: Path, given: str
) -> None:
    """A webhook given in `sinks.flags` (or as a `--sink` of `extraArgs`) is a container arg, not in
    config.yaml: the loop's `replay --config` sent its letters to the config's stdout, exit 0, and
    removed the file. Each path the loop reads is a mount of the render, and run against the render's
    ConfigMap the loop delivers every letter to the webhook and removes the taken file."""
    async with WebhookReceiver() as hook:
        flag = f"webhook:{hook.url}?mode=batch&batch_max_wait=0.05"
        values: dict[str, Any] = (
            {"sinks": {"flags": [flag]}} if given == "sinks.flags" else {"extraArgs": ["--sink", flag]}
        )
        docs = render(chart, values)
        local = _pod_files(docs, tmp_path)
        script = _readme_loop()
        # Every file or folder the loop names is one the chart mounts.
        named = set(re.findall(r"(?<![\w.])/(?:etc|var)/[\w./-]+", script))
        assert named and all(
            any(path == m or path.startswith(m.rstrip("/") + "/") for m in local) for path in named
        ), (named, sorted(local))
        assert "--sink-flags=/etc/eventrouter/sink-flags" in script
        # In one pass (the local paths are under /tmp too), longest first.
        mounts = "|".join(re.escape(m) for m in sorted(local, key=len, reverse=True))
        script = re.sub(rf"(?<![\w.]){mounts}", lambda m: str(local[m[0]]), script)
        script = script.replace("<sink>", "webhook").replace("<size>", "1Gi")
        data = local["/var/lib/eventrouter"]
        folder = data / "deadletter"
        keys = _letters(folder, "webhook", 12)

        bin_dir = str(Path(sys.executable).parent)  # the `eventrouter` the pod's image has on its PATH
        env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
        done = await asyncio.to_thread(
            subprocess.run, ["sh", "-c", script], capture_output=True, timeout=120, env=env
        )
        err = done.stderr.decode()
        assert done.returncode == 0, err
        summary = json.loads(err.strip().splitlines()[-1])
        assert list(summary["sinks"]) == ["webhook"], summary  # the config's stdout got none of them
        assert sorted(f"{i['uid']}/{i['occurrence']}" for r in hook.accepted for i in r.json()) == sorted(
            keys
        )
        assert sorted(p.name for p in folder.iterdir()) == ["webhook.replayed"]


def test_the_configmaps_sink_flags_are_the_pods_sink_args(chart: helm.Chart) -> None:
    """One source: the flags the pod gets and those `replay --sink-flags` reads are the same values."""
    flags = [
        "loki:http://loki.monitoring:3100?labels=cluster,namespace",
        "webhook:https://hooks.example/x?headers=Authorization:env:HOOK_AUTH&body_template=a  b ",
    ]
    values = {"sinks": {"flags": flags}, "extraArgs": ["--sink=stdout:?name=two", "--sink", "stdout:?name=3"]}
    docs = render(chart, values)
    sink_args = [a for a in _container(docs)["args"] if a.startswith("--sink=")]
    assert sink_args == [f"--sink={f}" for f in flags] + ["--sink=stdout:?name=two"]
    assert _one(docs, "ConfigMap")["data"]["sink-flags"].split("\n") == [
        *flags,
        "stdout:?name=two",
        "stdout:?name=3",
    ]
    default = render(chart, {})
    assert _one(default, "ConfigMap")["data"]["sink-flags"] == ""
    mounts = {m["mountPath"]: m for m in _container(default)["volumeMounts"]}
    assert mounts["/etc/eventrouter/sink-flags"]["readOnly"] is True


def test_a_sink_flag_with_a_line_break_is_refused(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmRenderError, match=r"sinks.flags\[0\]: a sink flag holds a line break"):
        render(chart, {"sinks": {"flags": ["stdout:?name=a\nloki:http://l"]}})


# --- F2: numbers as quantities -------------------------------------------------------------------


def test_a_cpu_or_memory_quantity_may_be_a_number(chart: helm.Chart) -> None:
    resources = {"requests": {"cpu": 0.5, "memory": 268435456}, "limits": {"cpu": 1.5, "memory": 536870912}}
    assert _container(render(chart, {"resources": resources}))["resources"] == resources
    with pytest.raises(helm.HelmValuesError):
        render(chart, {"resources": {"requests": {"cpu": -0.5}}})


# --- F3: mount paths -----------------------------------------------------------------------------

SECRET = {"existingSecret": "creds"}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"checkpoint": {"dataDir": "/tmp"}},
            "checkpoint.dataDir (/tmp) is also the path of the writable /tmp",
        ),
        (
            {"checkpoint": {"dataDir": "/tmp/"}},
            "checkpoint.dataDir (/tmp) is also the path of the writable /tmp",
        ),
        (
            {"credentials": {**SECRET, "mountPath": "/etc/eventrouter"}},
            "credentials.mountPath (/etc/eventrouter) holds the config file (/etc/eventrouter/config.yaml)",
        ),
        (
            {"checkpoint": {"dataDir": "/etc"}},
            "checkpoint.dataDir (/etc) holds the config file (/etc/eventrouter/config.yaml)",
        ),
        (
            {"credentials": {**SECRET, "mountPath": "/data"}, "checkpoint": {"dataDir": "/data"}},
            "checkpoint.dataDir (/data) is also the path of credentials.mountPath",
        ),
        (
            {"credentials": {**SECRET, "mountPath": "/data/secrets"}, "checkpoint": {"dataDir": "/data"}},
            "checkpoint.dataDir (/data) holds credentials.mountPath (/data/secrets)",
        ),
        (
            {"credentials": SECRET, "checkpoint": {"dataDir": "/etc/eventrouter/secrets/data"}},
            "checkpoint.dataDir (/etc/eventrouter/secrets/data) is inside credentials.mountPath",
        ),
        (
            {"credentials": {**SECRET, "mountPath": "/etc/eventrouter/sink-flags"}},
            "credentials.mountPath (/etc/eventrouter/sink-flags) is also the path of the sink flags file",
        ),
    ],
    ids=lambda v: json.dumps(v, sort_keys=True) if isinstance(v, dict) else "",
)
def test_a_mount_path_colliding_with_another_mount_is_refused(
    chart: helm.Chart, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        render(chart, values)


@pytest.mark.parametrize(
    "values",
    [
        {"checkpoint": {"dataDir": "/tmp/eventrouter"}},  # inside the writable /tmp: a mount point is made
        {"checkpoint": {"mode": "none", "dataDir": "/tmp"}},  # no data volume
        {"credentials": {"mountPath": "/etc/eventrouter"}},  # no Secret, no credentials volume
        {"credentials": {**SECRET, "mountPath": "/etc/eventrouter/creds"}},
    ],
    ids=lambda v: json.dumps(v, sort_keys=True),
)
def test_mount_paths_beside_the_charts_own_render(chart: helm.Chart, values: dict[str, Any]) -> None:
    paths = [m["mountPath"] for m in _container(render(chart, values))["volumeMounts"]]
    assert len(paths) == len(set(paths)), paths
