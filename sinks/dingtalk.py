"""DingTalk custom robot: signed, keyword-safe, digesting and rate-limited (docs/alerting.md).

``--sink=dingtalk:https://oapi.dingtalk.com/robot/send?access_token=...&secret=SEC...``

The robot answers HTTP 200 for everything and says in ``errcode`` what happened: 0 is the only
success; 130101 and 410100 ("send too fast": the robot is throttled) back off, holding the alerts;
310000 for the signature, its timestamp or the IP allowlist and an unknown ``access_token`` (300001,
300005) refuse the sender, not the message: retried (a secret reset in the console comes into the pod
a little later), warned of once per run, and so is a 401/403/407 of a gateway or proxy in front of
the robot (``proxy``, or the URL's user info), or its redirect (never followed); 310000 "keywords not
in content" and the others are the message's own: rejected and logged once per cause. The status
of a gateway's answer decides without its body being read; a 200's reply is the outcome, read within
request_timeout (a slow one is not sent again), and one that cannot be read (it stalls until then, is
cut off or cannot be decoded) is retried saying the alert may have been paged.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from typing import Any, ClassVar
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import orjson
from pydantic import AliasChoices, Field, field_validator, model_validator

from eventrouter import Secret, SinkContext, parse_retry_after
from eventrouter.options import StrList, http_url

from ._alerting import (
    AlertOptions,
    AlertSink,
    Clock,
    Delivery,
    Digest,
    check_template,
    robot_address,
    sample_template,
    unread_reply,
)
from ._scrub import credentials, scrub

__all__ = ["DingTalkOptions", "DingTalkSink", "dingtalk_sign"]

DEFAULT_URL = "https://oapi.dingtalk.com/robot/send"
ACTION_FIELDS = ("cluster", "namespace", "kind", "object", "reason")
"""The fields ``action_url`` may use (filled in URL-encoded)."""
LINK_MAX = 2048
"""Longest filled-in ``action_url``: an event's object name has no bound (legacy core/v1 Events), and
a link longer than browsers and proxies reliably take is no link."""
FIELD_MAX = 253
"""A field longer than a Kubernetes name (DNS subdomain) is left out of an overlong link."""
ANSWER_BYTES = 256 * 1024
"""Bytes of an answer read: the robot's JSON reply is far shorter; a longer one is a front's page."""


def dingtalk_sign(secret: str, timestamp_ms: int) -> str:
    """Base64 HMAC-SHA256 of ``"{timestamp}\\n{secret}"`` keyed by the secret (before URL encoding)."""
    mac = hmac.new(secret.encode(), f"{timestamp_ms}\n{secret}".encode(), hashlib.sha256).digest()
    return base64.b64encode(mac).decode()


def _split_url(data: Any) -> Any:
    """Move credentials out of a pasted webhook URL (``?access_token=..&secret=..``) into options."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    url = data.get("url") or DEFAULT_URL
    if not isinstance(url, str):
        return data
    parts = urlsplit(url)
    kept = []
    for k, v in parse_qsl(parts.query, keep_blank_values=True):
        if k in ("access_token", "secret", "sign"):
            if k in data and data[k] not in (None, v):
                raise ValueError(f"{k} is given both in the URL and as an option, with different values")
            data[k] = v
        elif k != "timestamp":
            kept.append((k, v))
    data["url"] = urlunsplit(parts._replace(query=urlencode(kept)))
    return data


class DingTalkOptions(AlertOptions):
    url: str = Field(
        DEFAULT_URL, description="Robot webhook URL (an access_token in its query is taken out)."
    )
    access_token: Secret | None = Field(None, description="The robot's access_token (or in the URL query).")
    throttle_backoff: float = Field(
        600.0,
        gt=0,
        allow_inf_nan=False,
        description="Seconds to pause after a 'send too fast' answer (130101, 410100): DingTalk throttles the robot "
        "for 10 minutes, so an earlier try only fails again.",
    )
    secret: Secret | None = Field(
        None,
        validation_alias=AliasChoices("secret", "sign"),
        description="Signing secret (SEC…), kube-eventer `sign`: requests carry timestamp + HMAC-SHA256 sign.",
    )
    keywords: StrList = Field(
        default_factory=list,
        description="The robot's security keywords; every message is made to contain one.",
    )
    action_url: str = Field(
        "", description="actionCard button URL; {cluster} {namespace} {kind} {object} {reason} are filled in."
    )
    action_title: str = Field("View events", description="actionCard button text.")

    @model_validator(mode="before")
    @classmethod
    def _split(cls, data: Any) -> Any:
        return _split_url(data)

    @field_validator("action_url")
    @classmethod
    def _action_url(cls, value: str) -> str:
        # Filled in at every send: one that cannot be filled, or does not make a link, fails here.
        if value:
            check_template(value, ACTION_FIELDS, "action_url")
            http_url(sample_template(value, ACTION_FIELDS, "action_url"), option="action_url")
        return value

    @model_validator(mode="after")
    def _complete(self) -> DingTalkOptions:
        if self.access_token is None or not self.access_token.get_secret_value():
            raise ValueError("access_token is required (in the URL query or as an option)")
        if self.msg_type == "actionCard" and not self.action_url:
            raise ValueError("msg_type=actionCard needs action_url (the card's button link)")
        if self.msg_type == "actionCard" and (mentions := self.mention_options()):
            # DingTalk takes `at` with text and markdown only: an actionCard's mentions were dropped
            # without a word, and its "@138… @all" text notified nobody.
            raise ValueError(
                f"{', '.join(mentions)}: an actionCard mentions nobody; use msg_type=markdown or text"
            )
        return self


_TOKENISH = re.compile(r"(access_token|sign|secret|timestamp)=[^&\s'\"]*")

REFUSED_TOKEN = {300001, 300005}
"""The access_token is no robot's (``token is not exist``): the robot removed, or its webhook reset."""

TOO_FAST = {130101, 410100}
"""Rate limited ("send too fast", the robot throttled for 10 minutes): 130101, and 410100 in newer
DingTalk answers; neither says anything about the message."""


class DingTalkSink(AlertSink[DingTalkOptions]):
    """DingTalk group robot: digests of Warning events, at most ``rate_per_minute`` messages a minute."""

    options_model = DingTalkOptions
    description = "DingTalk robot: signed, rate-limited digests of (Warning) events"
    robot: ClassVar[str] = "DingTalk robot"
    default_max_bytes: ClassVar[int] = 19_000
    hard_max_bytes: ClassVar[int] = 20_000  # the robot refuses larger bodies: 460101

    def __init__(self, options: DingTalkOptions, context: SinkContext, *, clock: Clock | None = None) -> None:
        super().__init__(options, context, clock=clock)
        # The URL's user info too (an authenticating egress gateway): an error may quote the URL.
        self._secrets = (
            credentials(
                [s.get_secret_value() for s in (options.access_token, options.secret) if s is not None],
                urls=[options.url],
            )
            + self.proxy_secrets
        )

    def redact(self, text: str) -> str:
        return _TOKENISH.sub(r"\1=****", scrub(text, self._secrets))

    def robot_identity(self) -> tuple[str, tuple[str, ...]]:
        # The access_token names the robot, at the address it is reached by (two test robots
        # under one token are two).
        assert self.options.access_token is not None
        return "URL and access_token", (
            robot_address(self.options.url),
            self.options.access_token.get_secret_value(),
        )

    # -------------------------------------------------------------- message

    def measure(self, text: str) -> int:
        return len(orjson.dumps(text)) - 2

    def payload_size(self, title: str, text: str, digest: Digest) -> int:
        return len(orjson.dumps(self.payload(title, text, digest)))

    def compose(self, digest: Digest) -> tuple[str, str]:
        title, text = super().compose(digest)
        keywords = self.options.keywords
        if keywords and not any(k in text for k in keywords):
            # Keyword security checks the content; the operator's keyword goes in as written.
            kw = keywords[0]
            title = f"{kw} {title}"
            text = text.replace("#### ", f"#### {kw} · ", 1) if self.markdown else f"{kw} · {text}"
        return title, text

    def payload(self, title: str, text: str, digest: Digest) -> dict[str, Any]:
        kind = self.msg_type
        if kind == "actionCard":
            link = self._link((digest.views or digest.summarised)[0].fields)
            return {
                "msgtype": "actionCard",
                "actionCard": {
                    "title": title,
                    "text": text,
                    "singleTitle": self.options.action_title,
                    "singleURL": link,
                },
            }
        mobiles, users, at_all = self.mentions(digest)
        at = {"atMobiles": mobiles, "atUserIds": users, "isAtAll": at_all}
        if kind == "text":
            return {"msgtype": "text", "text": {"content": text}, "at": at}
        return {"msgtype": "markdown", "markdown": {"title": title, "text": text}, "at": at}

    def _link(self, top: dict[str, str]) -> str:
        """``action_url`` filled in from the first group; when that is over ``LINK_MAX``, without
        the fields longer than a name (emptied: a dashboard shows everything rather than nothing), so
        one event's name can never make the card larger than the robot accepts."""
        template = self.options.action_url
        fill = {k: quote(top.get(k, ""), safe="") for k in ACTION_FIELDS}
        try:
            link = template.format_map(fill)
            if len(link) > LINK_MAX:
                short = {k: ("" if len(top.get(k, "")) > FIELD_MAX else v) for k, v in fill.items()}
                link = template.format_map(short)
        except (KeyError, ValueError, IndexError):
            return template
        return link if len(link) <= LINK_MAX else template.format_map(dict.fromkeys(ACTION_FIELDS, ""))

    def _url(self) -> str:
        assert self.options.access_token is not None
        parts = urlsplit(self.options.url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        query.append(("access_token", self.options.access_token.get_secret_value()))
        if self.options.secret is not None:
            ts = int(self.clock.wall() * 1000)
            query.append(("timestamp", str(ts)))
            query.append(("sign", dingtalk_sign(self.options.secret.get_secret_value(), ts)))
        return urlunsplit(parts._replace(query=urlencode(query)))

    # -------------------------------------------------------------- delivery

    async def deliver(self, title: str, text: str, digest: Digest, *, until: float) -> Delivery:
        # One request: the send started it within its budget (``AlertSink._flush``).
        body = orjson.dumps(self.payload(title, text, digest))
        headers = {"Content-Type": "application/json; charset=utf-8"}
        # Redirects are not followed: a 301/302 would turn the POST into a GET (aiohttp's default).
        async with self.session().post(
            self._url(), data=body, headers=headers, allow_redirects=False, **self.request_options()
        ) as resp:
            status = resp.status
            if status != 200:  # a gateway's: its status says it all, its body is never read
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                return self.http_failure("DingTalk robot", status, retry_after, resp.headers.get("Location"))
            # To its end: one read returned what had arrived, and a reply in two chunks was "not its
            # reply", so an accepted alert was sent (and paged) again, and a 130101 taken no pause for.
            raw, cut, unreadable = await self.read_reply(resp, ANSWER_BYTES)
        if unreadable is not None:
            return unread_reply("DingTalk robot", unreadable)
        return self.classify(raw, cut=cut)

    def classify(self, raw: bytes, *, cut: bool = False) -> Delivery:
        """Judge the robot's reply. ``cut``: longer than ``ANSWER_BYTES``, which no reply of the
        robot's is: a front's page, never parsed in part (its start could read like a reply)."""
        try:
            if cut:
                raise ValueError("longer than a robot's reply")
            reply = orjson.loads(raw)
            code = int(reply["errcode"])
            msg = self.redact(str(reply.get("errmsg", "")))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            snippet = self.redact(raw.decode("utf-8", "replace"))[:120]  # whole: a cut token stays hidden
            return Delivery(
                "retry", f"DingTalk robot answered something that is not its JSON reply: {snippet!r}"
            )
        if code == 0:
            return Delivery("ok")
        said = f"errcode {code} ({msg})"
        if code in TOO_FAST:
            return Delivery("retry", f"DingTalk robot says send too fast: {said}", too_fast=True)
        if code == -1:
            return Delivery("retry", f"DingTalk is busy: {said}")
        refused = _refused(code, msg)
        if refused:
            # The sender refused, whatever it sends (item 111's 401/403): dead-lettering every alert
            # until the new secret reached the pod lost a whole rotation's pages.
            return Delivery("retry", f"DingTalk robot refused our request: {said}: {refused}", refused=True)
        hint: dict[int, str] = {
            310000: "the robot's keyword security refused it (set keywords= to the robot's keywords)",
            460101: "the message is longer than the robot accepts (lower max_message_bytes)",
        }
        reason = f"DingTalk robot refused the message: {said}: " + hint.get(code, "permanent error")
        return Delivery("reject", reason, cause=f"{code}:{_cause(msg)}")


def _refused(code: int, msg: str) -> str:
    """What to check when the robot refused the sender (its credentials, clock or address) rather
    than the message; '' when the message's own content is the cause (310000 keywords not in content)."""
    if code in REFUSED_TOKEN:
        return (
            "the access_token is not valid for any robot (removed, or its webhook reset?): check access_token"
        )
    if code != 310000:
        return ""
    text = msg.casefold()
    if "keyword" in text:
        return ""
    if "sign" in text:
        return "the signature does not match: check secret (reset in the DingTalk console?)"
    if "timestamp" in text:
        return "the signature's timestamp is refused: is this host's clock more than an hour off?"
    if "whitelist" in text or "allowlist" in text:
        return "this address is not in the robot's IP allowlist"
    return "the robot's security settings refused it: check access_token, secret and its IP allowlist"


def _cause(msg: str) -> str:
    """The stable part of an errmsg (DingTalk appends links and request ids)."""
    return re.split(r"[,;\uff0c\uff1b]| more:", msg, maxsplit=1)[0].strip()
