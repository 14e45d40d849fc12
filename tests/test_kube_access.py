"""Kubernetes access through kubernetes-asyncio: kubeconfig contexts and exec credential plugins
with token rotation, against the project's API test server."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from eventrouter.app import Router, RouterSettings
from eventrouter.config import spec_for_class
from eventrouter.source.kube import failure_text
from eventrouter.source.watcher import WatchSettings
from eventrouter.testing import FakeApiServer, MemorySink, event_object
from eventrouter.testing.waiting import until

PLUGIN = """\
import json, pathlib, sys
here = pathlib.Path(sys.argv[1])
calls = here / "calls"
calls.write_text(str(int(calls.read_text() or 0) + 1) if calls.exists() else "1")
if (here / "fail-once").exists():
    (here / "fail-once").unlink()
    sys.exit("error: could not get token: RequestError: send request failed (the STS endpoint)")
print(json.dumps({
    "apiVersion": "client.authentication.k8s.io/v1beta1",
    "kind": "ExecCredential",
    "status": {"token": (here / "token").read_text().strip(), "expirationTimestamp": "2000-01-01T00:00:00Z"},
}))
"""


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(tokens={"tok-1"}) as server:
        server.bookmark_interval = 0.2
        yield server


def _router(kubeconfig: Path, context: str | None = None) -> Router:
    settings = RouterSettings(
        kubeconfig=str(kubeconfig),
        context=context,
        metrics_addr=None,
        watch=WatchSettings(watch_timeout=30, backoff_initial=0.05, backoff_max=0.2),
    )
    return Router(
        settings, [spec_for_class(MemorySink, {"name": "mem", "batch_max_wait": 0.01}, type_="memory")]
    )


def _exec_kubeconfig(api: FakeApiServer, tmp_path: Path) -> Path:
    plugin = tmp_path / "plugin.py"
    plugin.write_text(PLUGIN)
    plugin.chmod(plugin.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "token").write_text("tok-1")
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": api.url}}],
                "users": [
                    {
                        "name": "u",
                        "user": {
                            "exec": {
                                "apiVersion": "client.authentication.k8s.io/v1beta1",
                                "command": sys.executable,
                                "args": [str(plugin), str(tmp_path)],
                                "interactiveMode": "Never",
                            }
                        },
                    }
                ],
                "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "ctx",
            }
        )
    )
    return kubeconfig


async def test_exec_credential_plugin_tokens_are_used_and_refreshed(
    api: FakeApiServer, tmp_path: Path
) -> None:
    router = _router(_exec_kubeconfig(api, tmp_path))
    async with router.running():
        api.create_event(event_object(object_name="before-rotation"))
        sink = router.sinks["mem"]
        await sink.wait_for(1)
        # The credential provider rotates the token and the server stops accepting the old one.
        (tmp_path / "token").write_text("tok-2")
        api.tokens = {"tok-2"}
        api.disconnect_watches()
        api.create_event(event_object(object_name="after-rotation"))
        await sink.wait_for(2)
    assert int((tmp_path / "calls").read_text()) >= 2


async def test_an_exec_credential_plugin_that_fails_once_is_retried_and_the_router_keeps_running(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A token refresh during a short STS outage: the plugin exits 1 once. Before, the exception
    crashed the watch task and the router stopped, with exit code 0."""
    router = _router(_exec_kubeconfig(api, tmp_path))
    async with router.running():
        api.create_event(event_object(object_name="before"))
        sink = router.sinks["mem"]
        await sink.wait_for(1)
        (tmp_path / "fail-once").touch()
        (tmp_path / "token").write_text("tok-2")
        api.tokens = {"tok-2"}
        api.disconnect_watches()
        api.create_event(event_object(object_name="after"))
        await sink.wait_for(2)
        assert not (tmp_path / "fail-once").exists()  # the failing run happened
        assert not router._stopping
    assert router.exit_code == 0
    failed = [r.getMessage() for r in caplog.records if "CredentialPluginFailed" in r.getMessage()]
    assert failed and "the exec credential plugin of" in failed[0] and "could not get token" in failed[0]
    assert "crashed" not in caplog.text


async def test_kubeconfig_context_is_honoured(api: FakeApiServer, tmp_path: Path) -> None:
    good = tmp_path / "kubeconfig"
    api.kubeconfig(good)
    doc = yaml.safe_load(good.read_text())
    doc["clusters"].append({"name": "nowhere", "cluster": {"server": "http://127.0.0.1:9"}})
    doc["contexts"].append({"name": "broken", "context": {"cluster": "nowhere", "user": "fake"}})
    doc["current-context"] = "broken"
    good.write_text(yaml.safe_dump(doc))
    router = _router(good, context="fake")  # not the current context
    async with router.running():
        api.create_event(event_object())
        await router.sinks["mem"].wait_for(1)
        await until(lambda: router.ready()[0])


async def test_in_cluster_service_account_over_tls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As in a pod: KUBERNETES_SERVICE_HOST/PORT, the projected token and the cluster CA, over HTTPS."""
    from eventrouter.source.kube import connect
    from eventrouter.testing.tls import self_signed

    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    ca, server_tls = await self_signed(tmp_path)
    (sa / "ca.crt").write_bytes(ca.read_bytes())
    (sa / "token").write_text("sa-token")
    async with FakeApiServer(token="sa-token", ssl_context=server_tls) as api:
        host, port = api.url.removeprefix("https://").split(":")
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", host)
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", port)
        kube = await connect(service_account_dir=str(sa))
        assert kube.describe == "in-cluster service account"
        settings = RouterSettings(metrics_addr=None, watch=WatchSettings(watch_timeout=30))
        router = Router(
            settings, [spec_for_class(MemorySink, {"name": "mem", "batch_max_wait": 0.01}, type_="memory")]
        )
        async with router.running(kube):
            api.create_event(event_object(object_name="in-cluster"))
            await router.sinks["mem"].wait_for(1)


SLIM_IMPORT = """\
import sys
from eventrouter.source.kube_import import load
client, config = load()
assert callable(config.load_kube_config) and client.ApiClient and client.Configuration
slim = sorted(m for m in sys.modules if m.startswith("kubernetes_asyncio"))
assert not any(m.startswith("kubernetes_asyncio.client.models.") for m in slim), slim
assert not any(m.startswith("kubernetes_asyncio.client.api.") for m in slim), slim
print(len(slim))
# Another user in the same process still gets the whole library.
from kubernetes_asyncio import watch
from kubernetes_asyncio.client import CoreV1Api, CoreV1Event
import kubernetes_asyncio.client.models as models
assert models.CoreV1Event is CoreV1Event and callable(watch.Watch) and CoreV1Api
print(len([m for m in sys.modules if m.startswith("kubernetes_asyncio")]))
"""


def test_only_the_used_parts_of_kubernetes_asyncio_are_imported() -> None:
    # ~850 generated API and model modules (~35 MiB resident) stay unloaded unless something asks.
    import subprocess

    done = subprocess.run([sys.executable, "-c", SLIM_IMPORT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    slim, full = (int(n) for n in done.stdout.split())
    assert slim < 40 and full > 800


def _run_router(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "eventrouter.cli",
            "run",
            "--sink=stdout:",
            "--metrics-addr",
            "127.0.0.1:0",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def _outside_a_cluster(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("KUBERNETES_SERVICE_HOST", "KUBECONFIG")}
    return {**env, "HOME": str(home)}


def test_no_cluster_and_no_kubeconfig_exits_2_saying_what_is_missing(tmp_path: Path) -> None:
    done = _run_router(env=_outside_a_cluster(tmp_path))  # a HOME without .kube/config
    assert done.returncode == 2, done.stderr
    assert "no Kubernetes API to watch: not in a pod (KUBERNETES_SERVICE_HOST is not set)" in done.stderr
    assert "--demo" in done.stderr and "Traceback" not in done.stderr


def test_a_kubeconfig_that_cannot_be_read_exits_2_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "kubeconfig"
    bad.mkdir()  # unreadable as a file even for root
    done = _run_router("--kubeconfig", str(bad), env=_outside_a_cluster(tmp_path))
    assert done.returncode == 2, done.stderr
    assert f"kubeconfig {bad}: cannot read {bad}: Is a directory" in done.stderr
    assert "Traceback" not in done.stderr
    bad.rmdir()
    bad.write_text("apiVersion: v1\nkind: Config\nclusters: []\n")
    done = _run_router("--kubeconfig", str(bad), env=_outside_a_cluster(tmp_path))
    assert done.returncode == 2, done.stderr
    assert f"kubeconfig {bad}: Invalid kube-config file" in done.stderr


async def test_in_cluster_without_the_service_account_files_names_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from eventrouter.source.kube import KubeAccessError, connect

    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "6443")
    missing = tmp_path / "serviceaccount"
    with pytest.raises(KubeAccessError, match=f"in-cluster service account \\({missing}\\): "):
        await connect(service_account_dir=str(missing))


async def test_a_context_without_a_user_connects_without_credentials(tmp_path: Path) -> None:
    """`kubectl proxy`, a plain-HTTP dev cluster: the context names a cluster only. The router
    stopped with TypeError ("argument of type 'NoneType' is not iterable")."""
    async with FakeApiServer() as api:  # no tokens: anonymous requests are allowed, as through a proxy
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "proxy", "cluster": {"server": api.url}}],
                    "contexts": [{"name": "proxy", "context": {"cluster": "proxy"}}],
                    "current-context": "proxy",
                }
            )
        )
        router = _router(kubeconfig)
        async with router.running():
            api.create_event(event_object(object_name="through-the-proxy"))
            await router.sinks["mem"].wait_for(1)


async def test_kubeconfig_files_listed_in_KUBECONFIG_are_merged_as_kubectl_merges_them(
    api: FakeApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Clusters and contexts in one file, credentials in another (a common split): only the first
    file was read, so the context had no user (TypeError). As kubectl: missing and empty files are
    skipped, and the first file's current-context wins (kubernetes-asyncio's merge takes the last)."""
    from eventrouter.source.kube import KubeAccessError, connect

    full = yaml.safe_load(Path(api.kubeconfig(tmp_path / "full")).read_text())
    clusters, users, empty = tmp_path / "clusters.yaml", tmp_path / "users.yaml", tmp_path / "empty.yaml"
    clusters.write_text(yaml.safe_dump({k: v for k, v in full.items() if k != "users"}))
    users.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "users": full["users"],
                "clusters": [{"name": "nowhere", "cluster": {"server": "http://127.0.0.1:9"}}],
                "contexts": [{"name": "elsewhere", "context": {"cluster": "nowhere", "user": "fake"}}],
                "current-context": "elsewhere",
            }
        )
    )
    empty.write_text("")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", f"{tmp_path}/missing.yaml:{clusters}:{empty}:{users}")
    kube = await connect()
    assert kube.describe == f"kubeconfig {clusters}, {users}"
    assert kube.api.configuration.host == api.url  # the first file's current-context, not the last's
    router = _router(clusters)  # its settings' kubeconfig is not used: the client is given
    async with router.running(kube):
        api.create_event(event_object(object_name="merged"))
        await router.sinks["mem"].wait_for(1)
    monkeypatch.setenv("KUBECONFIG", f"{tmp_path}/missing.yaml:{tmp_path}/gone.yaml")
    with pytest.raises(KubeAccessError, match="none of its files exists"):
        await connect()


def test_an_exec_credential_plugin_that_is_not_installed_exits_2_saying_so(tmp_path: Path) -> None:
    """It said "cannot read aws-iam-authenticator: No such file or directory": no file to look for."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:9"}}],
                "users": [
                    {
                        "name": "u",
                        "user": {
                            "exec": {
                                "apiVersion": "client.authentication.k8s.io/v1beta1",
                                "command": "eventrouter-test-no-such-plugin",
                                "args": ["token"],
                                "interactiveMode": "Never",
                            }
                        },
                    }
                ],
                "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "ctx",
            }
        )
    )
    done = _run_router("--kubeconfig", str(kubeconfig), env=_outside_a_cluster(tmp_path))
    assert done.returncode == 2, done.stderr
    assert (
        f"kubeconfig {kubeconfig}: the exec credential plugin command 'eventrouter-test-no-such-plugin'"
        " is not found on PATH" in done.stderr
    )
    assert "cannot read" not in done.stderr and "Traceback" not in done.stderr


def test_a_request_that_timed_out_or_failed_without_text_is_named_not_logged_empty() -> None:
    """The checkpoint ConfigMap's "not written: " and "cannot read ... ()" logged an empty reason for
    a request timing out (asyncio's TimeoutError has no text): a session 28 review."""
    assert failure_text(TimeoutError()) == "timed out"
    assert failure_text(ConnectionResetError()) == "ConnectionResetError"
    assert failure_text(OSError("no route to host")) == "no route to host"
