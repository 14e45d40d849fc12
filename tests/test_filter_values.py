"""Filter values no event can carry, a robot's type filter left empty, a scalar option given twice
(session 31, findings 1, 3, 4c and 5 of a review of the filters), and what events do carry that the
first rule refused (findings 2 to 5 of its review)."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from eventrouter.app import Router
from eventrouter.config import ConfigError, build_specs, load_yaml
from eventrouter.engine.filter import compile_filter
from eventrouter.testing import event_object, make_occurrence
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.receivers.dingtalk import DingTalkReceiver
from eventrouter.testing.receivers.webhook import WebhookReceiver
from eventrouter.testing.routers import router_settings
from eventrouter.testing.waiting import until

ROBOT = "dingtalk:https://oapi.dingtalk.com/robot/send?access_token=t0k"
REGEX_HINT = "only message= and exclude_message= take a regular expression"
SEVERAL_HINT = "list several as"
PLUS_HINT = "holds a space read from a + in the --sink query, which may have been meant as a plus: write %20"


def _eventrouter(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "eventrouter.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ),
        cwd=cwd,
    )


def _refused(flag: str) -> str:
    with pytest.raises(ConfigError) as refused:
        build_specs([flag])
    return str(refused.value)


# ---- finding 1: values no event can carry ------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "option", "value", "hint"),
    [
        # kube-eventer's webhook `reason=` and kubernetes-event-exporter's rules are regexps.
        ("kinds=Pod|Deployment", "kinds", "Pod|Deployment", REGEX_HINT),
        ("kinds=Pod.*", "kinds", "Pod.*", REGEX_HINT),
        ("exclude_kinds=.*Set", "exclude_kinds", ".*Set", REGEX_HINT),
        ("reasons=^BackOff$", "reasons", "^BackOff$", REGEX_HINT),
        ("reasons=Failed.*|BackOff", "reasons", "Failed.*|BackOff", REGEX_HINT),
        ("exclude_reasons=(Pulled|Created)", "exclude_reasons", "(Pulled|Created)", REGEX_HINT),
        ("components=kube(let)?", "components", "kube(let)?", REGEX_HINT),
        ("reasons=Back%5Cw%2B", "reasons", "Back\\\\w+", REGEX_HINT),
        # Separators typed for a comma, a list written [a,b], a + that reads as a space.
        ("kinds=Pod%20Node", "kinds", "Pod Node", SEVERAL_HINT),
        ("kinds=Pod;Node", "kinds", "Pod;Node", SEVERAL_HINT),
        ("kinds=Pod+Node", "kinds", "Pod Node", "which no kind does"),
        ("kinds=[Pod,Node]", "kinds", "[Pod", "not [A,B]"),
        ("reasons=Back+Off", "reasons", "Back Off", PLUS_HINT),
        (
            "components=external-resizer+ebs.csi.aws.com",
            "components",
            "external-resizer ebs.csi.aws.com",
            PLUS_HINT,
        ),
        ("reasons=Failed%20to%20sync,Back+Off", "reasons", "Failed to sync", PLUS_HINT),
        ("reasons=BackOff;FailedMount", "reasons", "BackOff;FailedMount", SEVERAL_HINT),
        ("exclude_reasons=BackOff%09FailedMount", "exclude_reasons", "BackOff\\tFailedMount", SEVERAL_HINT),
        ("exclude_kinds=apps/Deployment", "exclude_kinds", "apps/Deployment", "is no kind"),
        # A typo of Normal or Warning.
        ("types=Warnig", "types", "Warnig", "did you mean Warning?"),
        ("types=Normal,Warnings", "types", "Warnings", "did you mean Warning?"),
        ("types=Nomal", "types", "Nomal", "did you mean Normal?"),
        ("types=Warn", "types", "Warn", "did you mean Warning?"),
        ("types=warn", "types", "warn", "did you mean Warning?"),
        ("types=Wraning", "types", "Wraning", "did you mean Warning?"),
    ],
)
def test_a_filter_value_no_event_can_carry_is_refused_naming_sink_option_and_value(
    query: str, option: str, value: str, hint: str
) -> None:
    """Such values were accepted and kept nothing: the sink ran "healthy", delivering nothing,
    counted only as filtered."""
    for flag in (f"stdout:?{query}", f"{ROBOT}&{query}"):
        text = _refused(flag)
        sink = "stdout" if flag.startswith("stdout") else "dingtalk"
        assert f"--sink #1 (sink '{sink}'): option '{option}': Value error, '{value}'" in text, text
        assert hint in text, text


@pytest.mark.parametrize(
    ("query", "kept", "dropped"),
    [
        ("kinds=Pod,*Set", {"kind": "ReplicaSet"}, {"kind": "Node"}),
        ("kinds=HorizontalPodAutoscaler", {"kind": "HorizontalPodAutoscaler"}, {"kind": "Pod"}),
        ("kinds=my-crd-kind,Foo_Bar", {"kind": "My-CRD-Kind"}, {"kind": "Pod"}),
        ("kinds=[PN]od?", {"kind": "Pods"}, {"kind": "Pod"}),
        ("reasons=Failed*", {"reason": "FailedMount"}, {"reason": "BackOff"}),
        ("reasons=Back?ff,[!P]ulled", {"reason": "Bulled"}, {"reason": "Pulled"}),
        ("reasons=v1.2-Upgraded,Node:Ready", {"reason": "Node:Ready"}, {"reason": "NodeReady"}),
        ("reasons=Back?Off", {"reason": "Back Off"}, {"reason": "BackOff"}),  # a space matched by ?
        ("components=k8s.io/kubelet,kube-*", {"component": "kube-proxy"}, {"component": "kubelet"}),
        ("exclude_reasons=*Failed*", {"reason": "BackOff"}, {"reason": "PodFailedMount"}),
        ("types=warning", {"type": "Warning"}, {"type": "Normal"}),  # spelt as the API server does
    ],
)
def test_names_and_globs_stay_valid_and_match(
    query: str, kept: dict[str, str], dropped: dict[str, str]
) -> None:
    """The guard of the test above: what a kind, reason or component may be is not refused."""
    (spec,) = build_specs([f"stdout:?{query}"])
    predicate = compile_filter(spec.filter)
    assert predicate is not None
    assert predicate(make_occurrence(**kept)) and not predicate(make_occurrence(**dropped))


# ---- a review of item 235: what it refused that events carry ------------------------------------


CSI_COMPONENTS = ["external-resizer ebs.csi.aws.com", "csi-attacher ebs.csi.aws.com"]
"""The CSI sidecars record events as `fmt.Sprintf("external-resizer %s", driverName)`."""
OPERATOR_REASON = "Failed to retrieve Node by ProviderID"
"""core/v1 does not check reasons: KubeKey's, 3scale's, OceanBase's operators write sentences."""
PROVISIONER = "ebs.csi.aws.com_ebs-csi-controller-7f5bd8c7c9-x4jbt_1700000000-8081-ebs.csi.aws.com"


@pytest.mark.parametrize(
    ("given", "kept", "dropped"),
    [
        ({"components": CSI_COMPONENTS}, {"component": CSI_COMPONENTS[0]}, {"component": "external-resizer"}),
        ({"exclude_reasons": [OPERATOR_REASON]}, {"reason": "BackOff"}, {"reason": OPERATOR_REASON.lower()}),
        ({"reasons": "Failed to delete tenant"}, {"reason": "Failed to delete tenant"}, {"reason": "Failed"}),
        ("?components=external-resizer%20ebs.csi.aws.com", {"component": CSI_COMPONENTS[0]}, {}),
        (
            "?exclude_reasons=Failed%20to%20delete%20tenant",
            {},
            {"reason": "Failed to delete tenant"},
        ),
        # `.*` is a glob too: a dot, then anything.
        ({"components": "ebs.*"}, {"component": PROVISIONER}, {"component": "ebs-csi-node"}),
        ("?reasons=cert-manager.*", {"reason": "cert-manager.io"}, {"reason": "cert-manager"}),
    ],
)
def test_reasons_and_components_with_a_space_or_a_dotted_glob_are_taken_and_match(
    given: dict[str, object] | str, kept: dict[str, str], dropped: dict[str, str]
) -> None:
    """Item 235 refused a space in every reason and component (the CSI sidecars' components, the
    operators' sentence reasons) and `.*` as a regexp (over dotted names it is a glob): a router that
    worked exited 2 after the upgrade. A space from YAML or written %20 is part of the name."""
    # A --sink query, or a YAML entry.
    flags, entries = (
        ([f"stdout:{given}"], []) if isinstance(given, str) else ([], [{"type": "stdout", **given}])
    )
    (spec,) = build_specs(flags, entries)
    predicate = compile_filter(spec.filter)
    assert predicate is not None
    assert predicate(make_occurrence(**kept)) and not predicate(make_occurrence(**dropped))


@pytest.mark.parametrize(
    "types",
    ["Abnormal", "Informational", "Running", "Learning", "Morning", "Paging", "NormalEvent", "WarningEvent"],
)
def test_a_custom_type_that_is_no_typo_of_normal_or_warning_is_kept_with_a_warning(
    types: str, caplog: pytest.LogCaptureFixture
) -> None:
    """`difflib` at a 0.6 cutoff called these typos of Normal or Warning and refused them (exit 2)
    on every sink. They are kept as given, with the warning every type but those two has."""
    with caplog.at_level(logging.WARNING, logger="eventrouter.config"):
        (stdout, robot) = build_specs([f"stdout:?types={types}", f"{ROBOT}&types=Warning,{types}"])
    assert stdout.filter.types == [types] and robot.filter.types == ["Warning", types]
    assert any(f"{types} is neither Normal nor Warning" in r.getMessage() for r in caplog.records)


def test_a_yaml_block_of_names_one_a_line_is_refused_naming_the_line_break() -> None:
    """A space is part of a reason now; a line break (`reasons: |` with one name a line) is not."""
    with pytest.raises(ConfigError) as refused:
        build_specs([], [{"type": "stdout", "reasons": "BackOff\nFailedMount\n"}])
    assert "option 'reasons': Value error, 'BackOff\\nFailedMount' holds '\\n'" in str(refused.value)
    assert SEVERAL_HINT in str(refused.value)


async def test_a_router_delivers_what_csi_components_operator_reasons_and_dotted_globs_select(
    tmp_path: Path,
) -> None:
    """End to end, as the review ran it: each sink receives what its filter names, nothing else."""
    async with FakeApiServer(token="t") as api, WebhookReceiver() as hook:
        for kind, reason, component in (
            ("PersistentVolumeClaim", "VolumeResizeFailed", CSI_COMPONENTS[0]),
            ("Pod", "BackOff", "kubelet"),
            ("KKInstance", OPERATOR_REASON, "kubekey-controller"),
            ("PersistentVolumeClaim", "ProvisioningSucceeded", PROVISIONER),
        ):
            api.create_event(event_object(kind=kind, reason=reason, component=component))
        filters: dict[str, dict[str, object]] = {
            "csi": {"components": CSI_COMPONENTS},
            "operator": {"exclude_reasons": [OPERATOR_REASON]},
            "dotted": {"components": ["ebs.*"]},
        }
        specs = build_specs(
            [],
            [
                {
                    "type": "webhook",
                    "name": name,
                    "url": f"{hook.url}?route={name}",
                    "batch_max_wait": 0.02,
                    **f,
                }
                for name, f in filters.items()
            ],
        )
        router = Router(router_settings(api, tmp_path), specs)

        def received(name: str) -> list[str]:
            return [x["reason"] for r in hook.accepted if r.query == f"route={name}" for x in r.json()]

        async with router.running():
            await until(lambda: sum(len(received(name)) for name in filters) == 5)
            filtered = router.metrics.filtered
            await until(lambda: [filtered.labels(n)._value.get() for n in filters] == [3, 1, 3])
        assert received("csi") == ["VolumeResizeFailed"]
        assert sorted(received("operator")) == ["BackOff", "ProvisioningSucceeded", "VolumeResizeFailed"]
        assert received("dotted") == ["ProvisioningSucceeded"]


def test_a_type_other_than_normal_or_warning_is_refused_on_a_robot_and_warned_elsewhere(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`types=` replaces a robot's `level=Warning` default: a type no Kubernetes event carries made
    the alert channel go quiet. Elsewhere the type is kept as given (core/v1 does not check it)."""
    text = _refused(f"{ROBOT}&types=Error")
    assert "(sink 'dingtalk'): option 'types': Error has neither Normal nor Warning" in text, text
    assert "replaces this sink's default level=Warning" in text
    with caplog.at_level(logging.WARNING, logger="eventrouter.config"):
        (stdout, robot) = build_specs(["stdout:?types=Error", f"{ROBOT}&types=Warning,Error"])
    assert stdout.filter.types == ["Error"] and robot.filter.types == ["Warning", "Error"]
    warned = [r.getMessage() for r in caplog.records]
    assert any("(sink 'stdout'): option 'types': Error is neither Normal nor Warning" in m for m in warned)
    assert any("(sink 'dingtalk'): option 'types': Error is neither" in m for m in warned), warned


def test_exclude_globs_that_drop_every_name_are_refused() -> None:
    for query in ("exclude_kinds=*?", "exclude_reasons=?*", "exclude_namespaces=**?"):
        assert "drops everything" in _refused(f"stdout:?{query}")


def test_a_space_before_an_option_name_is_named() -> None:
    text = _refused("stdout:?level=Warning& namespaces=a")
    assert "option 'namespaces' has white space around its name" in text, text


def test_check_and_run_exit_2_and_check_shows_each_sinks_filter(tmp_path: Path) -> None:
    """`types=Warnig` on a robot passed `check` (exit 0) and the robot never paged; nothing on
    screen showed what a sink keeps."""
    for command in ("check", "run"):
        extra = ["--offline"] if command == "check" else ["--kubeconfig", str(tmp_path / "none")]
        result = _eventrouter(command, *extra, f"--sink={ROBOT}&types=Warnig", cwd=tmp_path)
        assert result.returncode == 2, result.stdout + result.stderr
        assert "(sink 'dingtalk'): option 'types': Value error, 'Warnig' is no event type" in result.stderr
    result = _eventrouter(
        "check",
        "--offline",
        f"--sink={ROBOT}&kinds=Pod,*Set",
        "--sink=webhook:http://h.example/x?level=Warning&reasons=Failed*,BackOff&min_count=2",
        "--sink=stdout",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "valid dingtalk (dingtalk https://oapi.dingtalk.com/robot/send)  filter: level=Warning (default); "
        "kinds=Pod,*Set",
        "valid webhook (webhook http://h.example/x)  filter: level=Warning; reasons=Failed*,BackOff; min_count=2",
        "valid stdout (stdout)",
    ]


# ---- finding 3: a robot's type filter left empty --------------------------------------------------


@pytest.mark.parametrize(
    "entry",
    ["level:", "level: ~", "level: null", "types: []", "types:", "types: ''"],
)
def test_an_empty_type_filter_on_a_robot_keeps_its_warning_default(tmp_path: Path, entry: str) -> None:
    """A YAML `level:` left without a value (commented out, a blank Helm value) counted as a type
    filter given: it replaced the robot's `level=Warning` with none, and it paged every Normal
    event. Unset instead, as an empty list is elsewhere."""
    config = tmp_path / "c.yaml"
    config.write_text(
        "sinks:\n"
        "  - type: dingtalk\n    url: https://oapi.dingtalk.com/robot/send?access_token=t\n"
        f"    {entry}\n"
        f"  - type: stdout\n    {entry}\n"
    )
    robot, stdout = build_specs([], load_yaml(config).sinks)
    predicate = compile_filter(robot.filter)
    assert predicate is not None and robot.filter.level == "Warning", robot.filter
    assert not predicate(make_occurrence(type="Normal")) and predicate(make_occurrence(type="Warning"))
    assert compile_filter(stdout.filter) is None  # elsewhere unset is no filter, as before
    result = _eventrouter("check", "--offline", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "filter: level=Warning (default)" in result.stdout.splitlines()[0]


def test_an_empty_level_text_stays_refused() -> None:
    """Item 93: `level=` given empty is refused, not unset."""
    assert "level must be Normal or Warning, not ''" in _refused(f"{ROBOT}&level=")


async def test_a_robot_whose_yaml_level_is_null_pages_warnings_only(tmp_path: Path) -> None:
    async with FakeApiServer(token="t") as api, DingTalkReceiver() as robot:
        api.create_event(event_object(object_name="web-0", reason="Pulled", type="Normal", message="pulled"))
        api.create_event(event_object(object_name="web-1", reason="BackOff", type="Warning"))
        (spec,) = build_specs(
            [],
            [{"type": "dingtalk", "name": "robot", "url": robot.url, "level": None, "batch_max_wait": 0.02}],
        )
        router = Router(router_settings(api, tmp_path), [spec])
        async with router.running():
            filtered = router.metrics.filtered.labels("robot")
            await until(lambda: filtered._value.get() == 1 and robot.accepted)
        texts = [json.dumps(m.payload, ensure_ascii=False) for m in robot.accepted]
        assert any("BackOff" in t for t in texts) and not any("Pulled" in t for t in texts), texts


# ---- finding 4c: the aliases docs/sinks.md lists ---------------------------------------------------


def test_every_alias_the_common_options_table_lists_is_accepted_in_a_flag() -> None:
    """sinks.md listed `type` as an alias of `types`: a --sink query refuses `type` and in YAML it
    is the sink's type, so no one could use it."""
    text = (Path(__file__).parent.parent / "docs" / "sinks.md").read_text(encoding="utf-8")
    common = text.split("## Filter options (every sink)", 1)[1]  # and the pipeline options after it
    rows = re.findall(r"^\| `(\w+)` \| ([^|]*) \| ([^|]*) \|", common, flags=re.MULTILINE)
    values = {"types": "Warning", "message": "x", "components": "kubelet"}
    checked = 0
    for name, aliases, _ in rows:
        for alias in re.findall(r"`(\w+)`", aliases):
            (spec,) = build_specs([f"stdout:?{alias}={values.get(name, '1')}"])
            assert getattr(spec.filter, name, None) or getattr(spec.pipeline, name, None), (name, alias)
            checked += 1
    assert checked >= 3  # message_regex, component, and the pipeline's aliases at least


def test_type_in_a_query_points_at_types() -> None:
    assert "to keep events of a type, write types=Warning" in _refused("stdout:?type=Warning")


# ---- finding 5: a scalar option given twice ---------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "option", "hint"),
    [
        ("stdout:?message=Failed&message=BackOff", "message", "join them in one regular expression: A|B"),
        ("stdout:?exclude_message=a&exclude_message=b", "exclude_message", "A|B"),
        (f"{ROBOT}&level=Warning&level=Normal", "level", "takes one value"),
        ("stdout:?min_count=2&min_count=3", "min_count", "takes one value"),
        ("stdout:?batch_max_events=10&batch_max_events=20", "batch_max_events", "takes one value"),
        (f"{ROBOT}&msg_type=text&msg_type=markdown", "msg_type", "takes one value"),
    ],
)
def test_a_scalar_option_given_twice_is_refused_naming_it(flag: str, option: str, hint: str) -> None:
    """The last value was kept without a word: `message=A&message=B` dropped what matched only A,
    `level=Warning&level=Normal` made a robot page Normal events (kube-eventer took the first)."""
    text = _refused(flag)
    assert f"option {option!r} is given 2 times" in text and hint in text, text


def test_a_list_option_repeated_and_a_one_item_list_for_a_scalar_stay_valid() -> None:
    (spec,) = build_specs(["stdout:?kinds=Pod&kinds=Node&types=Warning&types=Normal"])
    assert spec.filter.kinds == ["Pod", "Node"] and spec.filter.types == ["Warning", "Normal"]
    (spec,) = build_specs([], [{"type": "stdout", "level": ["Warning"], "message": ["x"]}])
    assert spec.filter.level == "Warning" and spec.filter.message == "x"
