"""The example plugin (examples/eventrouter-splunk-hec) installs into a fresh virtual environment,
shows up in ``eventrouter sinks`` and receives a whole recording through ``--sink=splunk_hec:...``.

How the fresh environment is made, and why: ``python -m venv`` (no ``--system-site-packages``: from
a venv's python that would expose the *base* interpreter's packages, not this environment's), then
wheels of eventrouter and of the example, built from copies of their sources (setuptools writes
``build/`` and ``*.egg-info`` next to the sources), installed with ``--no-deps --no-index``.
Third-party dependencies (aiohttp, pydantic, pytest, ...) come from this test's own environment
through a ``.pth`` file that *appends* its site-packages to ``sys.path``: a plain path line does not
run that directory's own ``.pth`` files, so the editable eventrouter's import hook stays out, and the
fresh venv's own site-packages comes first. ``test_the_fresh_environment_uses_its_own_eventrouter``
proves the installed copies are the ones imported.

Building the wheels needs setuptools>=77 (PEP 639 license strings): taken from this environment when
it has it, else pip's build isolation fetches it from the configured package index.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "eventrouter-splunk-hec"
RECORDING = ROOT / "eventrouter" / "testing" / "data" / "watch-core-v1.jsonl"
TOKEN = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
SKIP_COPY = shutil.ignore_patterns(
    ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "examples", "tests"
)


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTEST_CURRENT_TEST")
    }
    env.update(PYTHONDONTWRITEBYTECODE="1", PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    return env


def _run(*cmd: str | Path, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run a command; ``cwd`` must not hold an ``eventrouter`` folder (``python -c`` imports from it)."""
    result = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{cmd} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


def _setuptools_builds_here() -> bool:
    try:
        major = int(importlib.metadata.version("setuptools").split(".")[0])
    except importlib.metadata.PackageNotFoundError:
        return False
    return major >= 77


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("plugin")
    core, example, wheels = tmp / "eventrouter-src", tmp / "example-src", tmp / "wheels"
    shutil.copytree(ROOT, core, ignore=SKIP_COPY)
    shutil.copytree(EXAMPLE, example, ignore=SKIP_COPY)
    isolation = ["--no-build-isolation"] if _setuptools_builds_here() else []
    _run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        *isolation,
        "-w",
        wheels,
        core,
        example,
        cwd=tmp,
    )

    env_dir = tmp / "venv"
    _run(sys.executable, "-m", "venv", env_dir, cwd=tmp)
    python = env_dir / "bin" / "python"
    site = Path(
        _run(
            python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp
        ).stdout.strip()
    )
    outer = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "_outer_dependencies.pth").write_text("".join(f"{p}\n" for p in outer))
    _run(
        python,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-deps",
        "--no-index",
        *sorted(wheels.glob("*.whl")),
        cwd=tmp,
    )
    return env_dir


def test_the_fresh_environment_uses_its_own_eventrouter(venv: Path) -> None:
    code = "import eventrouter, eventrouter_sinks, eventrouter_splunk_hec as p; print(eventrouter.__file__, eventrouter_sinks.__file__, p.__file__)"
    paths = _run(venv / "bin" / "python", "-c", code, cwd=venv.parent).stdout.split()
    assert len(paths) == 3 and all(Path(p).is_relative_to(venv) for p in paths), paths


def test_the_distribution_installs_no_top_level_sinks_module(venv: Path) -> None:
    """The built-in sinks live in the repository's sinks/ folder but install as eventrouter_sinks."""
    code = "import importlib.util as u; print(u.find_spec('sinks') is None, u.find_spec('eventrouter_sinks.loki') is not None)"
    assert _run(venv / "bin" / "python", "-c", code, cwd=venv.parent).stdout.split() == ["True", "True"]
    (wheel,) = (venv.parent / "wheels").glob("eventrouter-0*.whl")
    import zipfile

    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"eventrouter", "eventrouter_sinks"}


def test_eventrouter_sinks_lists_the_plugin_with_its_distribution(venv: Path) -> None:
    out = json.loads(_run(venv / "bin" / "eventrouter", "sinks", "--json", cwd=venv.parent).stdout)
    plugin = out["sinks"]["splunk_hec"]
    assert plugin["distribution"] == "eventrouter-splunk-hec 0.1.0"
    assert {row["name"] for row in plugin["options"]} >= {"url", "token", "index", "sourcetype"}
    assert "webhook" in out["sinks"]  # the built-ins still load next to it


def _fake_hec_module() -> ModuleType:
    """The example's FakeHEC, loaded from its file: this environment does not install the example."""
    path = EXAMPLE / "src" / "eventrouter_splunk_hec" / "fake.py"
    spec = importlib.util.spec_from_file_location("_example_fake_hec", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


async def test_replay_routes_every_recorded_occurrence_to_the_plugin(venv: Path) -> None:
    fake: Any = _fake_hec_module()
    async with fake.FakeHEC(tokens={TOKEN}, indexes={"k8s"}) as hec:
        sink = f"--sink=splunk_hec:{hec.url}?token=env:HEC_TOKEN&index=k8s&batch_max_events=40"
        proc = await asyncio.create_subprocess_exec(
            str(venv / "bin" / "eventrouter"),
            "replay",
            str(RECORDING),
            sink,
            "--cluster-name",
            "rec",
            "--timeout",
            "60",
            env=_env(HEC_TOKEN=TOKEN),
            cwd=venv.parent,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(90):
            stdout, stderr = await proc.communicate()
        events = list(hec.events)
    out = stdout.decode() + stderr.decode()
    assert proc.returncode == 0, out
    assert TOKEN not in out
    keys = {(e["event"]["uid"], e["event"]["occurrence"]) for e in events}
    assert len(events) == 126 and len(keys) == 126
    assert all(e["index"] == "k8s" and e["host"] == "rec" and e["event"]["cluster"] == "rec" for e in events)
    summary = json.loads(stderr.decode().strip().splitlines()[-1])
    assert summary["occurrences"] == 126 and summary["sinks"]["splunk_hec"]["delivered"] == 126


def test_the_example_own_tests_pass_in_the_fresh_environment(venv: Path) -> None:
    result = _run(
        venv / "bin" / "python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests", cwd=EXAMPLE
    )
    assert " passed" in result.stdout and "failed" not in result.stdout, result.stdout
