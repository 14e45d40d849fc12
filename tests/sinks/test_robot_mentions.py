"""Mention options a message type cannot carry (session 31's robot review, finding 5).

``at_all``, ``at_all_reasons`` and ``at_mobiles`` on a WeCom group robot sending markdown (its
default), any ``at_*`` on WeCom's application API or on a DingTalk ``actionCard``: each was accepted
and dropped without a word, so `at_all_reasons=OOMKilling` paged nobody for an OOMKilling. They are
refused at configuration, naming the options, as items 39 and 47 did for settings accepted and
ignored. The DingTalk receiver applied ``at`` with every msgtype, so a test of actionCard mentions
passed against it; like DingTalk it now reads ``at`` with text and markdown only.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import orjson
import pytest

from eventrouter.config import ConfigError, build_specs
from eventrouter.testing.receivers.dingtalk import DingTalkReceiver

WECOM = "wecom:https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=k3y"
WECHAT = "wechat:?corp_id=ww1&corp_secret=s3cret&agent_id=1000002&to_user=alice"
DINGTALK = "dingtalk:https://oapi.dingtalk.com/robot/send?access_token=t0k"
CARD = f"{DINGTALK}&msg_type=actionCard&action_url=https://grafana.example/d/k8s"
MARKDOWN_HINT = "msg_type=text: a WeCom markdown message mentions only user ids (at_user_ids)"
APP_HINT = "the application API mentions nobody; its recipients are to_user, to_party and to_tag"
CARD_HINT = "an actionCard mentions nobody; use msg_type=markdown or text"


def refused(flag: str) -> str:
    with pytest.raises(ConfigError) as error:
        build_specs([flag])
    return str(error.value)


@pytest.mark.parametrize(
    ("flag", "named", "hint"),
    [
        (f"{WECOM}&at_all=true", "at_all needs", MARKDOWN_HINT),
        (
            f"{WECOM}&at_all_reasons=OOMKilling&at_mobiles=13800000000",
            "at_mobiles, at_all_reasons need",
            MARKDOWN_HINT,
        ),
        (
            f"{WECOM}&msg_type=markdown&at_mobiles=13800000000&at_user_ids=ops",
            "at_mobiles needs",
            MARKDOWN_HINT,
        ),
        (f"{WECHAT}&at_user_ids=ops", "at_user_ids:", APP_HINT),
        (f"{WECHAT}&msg_type=markdown&at_all=true&at_reasons=OOMKilling", "at_reasons, at_all:", APP_HINT),
        (f"{CARD}&at_mobiles=13800000000", "at_mobiles:", CARD_HINT),
        (f"{CARD}&at_all_reasons=OOMKilling&at_user_ids=ops", "at_user_ids, at_all_reasons:", CARD_HINT),
    ],
    ids=[
        "wecom-markdown-at_all",
        "wecom-markdown-reasons-mobiles",
        "wecom-markdown-explicit",
        "wechat-user-ids",
        "wechat-at_all",
        "actioncard-mobiles",
        "actioncard-reasons",
    ],
)
def test_a_mention_option_the_message_type_cannot_carry_is_refused_naming_it(
    flag: str, named: str, hint: str
) -> None:
    text = refused(flag)
    assert named in text and hint in text, text


@pytest.mark.parametrize(
    "flag",
    [
        f"{WECOM}&at_user_ids=ops&at_reasons=OOMKilling",  # markdown: <@userid>
        f"{WECOM}&msg_type=text&at_all_reasons=OOMKilling&at_mobiles=13800000000",
        f"{DINGTALK}&at_all_reasons=OOMKilling&at_mobiles=13800000000",
        f"{DINGTALK}&msg_type=text&at_all=true",
        WECHAT,
        CARD,
    ],
)
def test_mentions_a_message_type_carries_stay_valid(flag: str) -> None:
    build_specs([flag])


def test_check_exits_2_naming_the_options(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "eventrouter.cli",
            "check",
            "--offline",
            f"--sink={WECOM}&at_all_reasons=OOMKilling",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ),
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "(sink 'wecom')" in result.stderr and f"at_all_reasons needs {MARKDOWN_HINT}" in result.stderr


@pytest.mark.parametrize("msgtype", ["actionCard", "link"])
async def test_the_dingtalk_receiver_reads_at_with_text_and_markdown_only(msgtype: str) -> None:
    """DingTalk documents ``at`` for text and markdown; another msgtype's notifies nobody."""
    part: dict[str, str] = {"title": "k8s", "text": "@13800000000 @all"}
    if msgtype == "actionCard":
        part |= {"singleTitle": "View", "singleURL": "https://grafana.example/d/k8s"}
    else:
        part["messageUrl"] = "https://grafana.example/d/k8s"
    at = {"atMobiles": ["13800000000"], "atUserIds": ["ops"], "isAtAll": True}
    async with DingTalkReceiver(access_token="tok") as robot, aiohttp.ClientSession() as session:
        for payload in (
            {"msgtype": msgtype, msgtype: part, "at": at},
            {"msgtype": "markdown", "markdown": part, "at": at},
        ):
            headers = {"Content-Type": "application/json"}
            async with session.post(robot.url, data=orjson.dumps(payload), headers=headers) as resp:
                assert (await resp.json())["errcode"] == 0
    card, markdown = robot.accepted
    assert card.mentions == {"mobiles": [], "user_ids": [], "all": False}
    assert markdown.mentions == {"mobiles": ["13800000000"], "user_ids": ["ops"], "all": True}
