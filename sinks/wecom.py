"""WeChat Work (WeCom): the group robot webhook and the application message API (docs/alerting.md).

Group robot: ``--sink=wecom:https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=...``
Application API (kube-eventer's ``wechat`` sink): ``--sink=wechat:?corp_id=..&corp_secret=..&agent_id=..&to_user=..``
— the access token comes from ``/cgi-bin/gettoken``, is cached, refreshed before ``expires_in`` ends,
and refreshed (then the message resent once) when the API answers 40014 / 42001.

Replies are HTTP 200 with an ``errcode``: 0 is the only success; 45009 ("api freq out of limit")
backs off; a refused webhook key (93000), corp id or secret (40013, 40001, 40091) or address (60020)
is retried (a key or secret reset in the console reaches the pod a little later), warned of once per
run, and so is a 401/403/407 of a gateway or proxy in front of WeCom (``proxy``, or the URL's user
info), or its redirect (never followed); a gateway's 429/5xx waits its Retry-After; agent,
recipient and message errors are permanent. The status of a gateway's answer decides without its body
being read; a 200's reply is the outcome, read within request_timeout (a slow one is not sent again),
and one that cannot be read (it stalls until then, is cut off or cannot be decoded) is retried saying
the alert may have been paged.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiohttp
import orjson
from pydantic import AliasChoices, BeforeValidator, Field, model_validator

from eventrouter import Secret, SinkContext, SinkError, parse_retry_after
from eventrouter.options import StrList, redact_url

from ._alerting import AlertOptions, AlertSink, Clock, Delivery, Digest, robot_address, unread_reply
from ._scrub import credentials, scrub

__all__ = ["WeComOptions", "WeComSink"]

DEFAULT_ROBOT_URL = "https://qyapi.weixin.qq.com/cgi-bin/webhook/send"
DEFAULT_API = "https://qyapi.weixin.qq.com"
ANSWER_BYTES = 256 * 1024
"""Bytes of a message answer read: WeCom's JSON reply is far shorter; a longer one is a front's page."""
TOKEN_ANSWER_BYTES = 64 * 1024
"""Bytes of a gettoken answer read (its reply is a token and two numbers)."""


def _users(value: Any) -> Any:
    """kube-eventer takes ``a,b``; WeCom itself ``a|b``: accept both."""
    if isinstance(value, str):
        return [u.strip() for u in re.split(r"[,|]", value) if u.strip()]
    return value


def _split_url(data: Any) -> Any:
    if not isinstance(data, dict):
        return data
    data = dict(data)
    url = data.get("url") or ""
    if not isinstance(url, str) or not url:
        return data
    parts = urlsplit(url)
    kept = []
    for k, v in parse_qsl(parts.query, keep_blank_values=True):
        if k == "key":
            if data.get("key") not in (None, v):
                raise ValueError("key is given both in the URL and as an option, with different values")
            data["key"] = v
        elif k != "access_token":  # kube-eventer's documented URL carries one; tokens are fetched here
            kept.append((k, v))
    data["url"] = urlunsplit(parts._replace(query=urlencode(kept)))
    return data


class WeComOptions(AlertOptions):
    key: Secret | None = Field(None, description="Group robot webhook key (or in the URL query).")
    corp_id: str = Field(
        "", validation_alias=AliasChoices("corp_id", "corpid"), description="Application API: corp id."
    )
    corp_secret: Secret | None = Field(
        None,
        validation_alias=AliasChoices("corp_secret", "corpsecret"),
        description="Application API: the application's secret.",
    )
    agent_id: int | None = Field(
        None, validation_alias=AliasChoices("agent_id", "agentid"), description="Application API: agent id."
    )
    to_user: Annotated[list[str], BeforeValidator(_users)] = Field(
        default_factory=lambda: ["@all"],
        validation_alias=AliasChoices("to_user", "touser"),
        description="Application API: user ids (a,b or a|b); default @all.",
    )
    to_party: StrList = Field(default_factory=list, description="Application API: department ids.")
    to_tag: StrList = Field(default_factory=list, description="Application API: tag ids.")

    @model_validator(mode="before")
    @classmethod
    def _split(cls, data: Any) -> Any:
        return _split_url(data)

    @model_validator(mode="after")
    def _mode(self) -> WeComOptions:
        app = bool(self.corp_id or self.corp_secret or self.agent_id is not None)
        if app and self.key is not None:
            raise ValueError(
                "give either key (group robot) or corp_id/corp_secret/agent_id (application API)"
            )
        if app:
            missing = [
                n
                for n, v in (
                    ("corp_id", self.corp_id),
                    ("corp_secret", self.corp_secret),
                    ("agent_id", self.agent_id),
                )
                if not v and v != 0
            ]
            if missing:
                raise ValueError(f"the application API needs {', '.join(missing)}")
        elif self.key is None or not self.key.get_secret_value():
            raise ValueError(
                "give key (group robot webhook) or corp_id, corp_secret and agent_id (application API)"
            )
        if self.msg_type == "actionCard":
            raise ValueError("WeCom messages are text or markdown")
        # Mentions a message cannot carry were dropped without a word: `at_all_reasons=OOMKilling`
        # on a default robot paged nobody for an OOMKilling.
        if app and (mentions := self.mention_options()):
            raise ValueError(
                f"{', '.join(mentions)}: the application API mentions nobody; its recipients are "
                "to_user, to_party and to_tag"
            )
        if not app and (self.msg_type or "markdown") == "markdown":
            lost = self.mention_options(("at_mobiles", "at_all", "at_all_reasons"))
            if lost:
                raise ValueError(
                    f"{', '.join(lost)} {'needs' if len(lost) == 1 else 'need'} msg_type=text: a WeCom "
                    "markdown message mentions only user ids (at_user_ids)"
                )
        return self

    @property
    def app(self) -> bool:
        return bool(self.corp_id)


_TOKENISH = re.compile(r"(access_token|key|corpsecret)=[^&\s'\"]*")

# Answers meaning "the token is no good": refresh it and resend once.
TOKEN_EXPIRED = {40014, 42001, 41001}
RETRYABLE = {-1, 45033, 45009, 45011}
REFUSED: dict[int, str] = {
    93000: "the webhook key is not valid (robot removed, or its webhook reset?): check key",
    40001: "corp_secret is not valid (reset in the WeCom console?): check corp_secret",
    40013: "corp_id is not valid: check corp_id",
    40091: "corp_secret is not valid (reset in the WeCom console?): check corp_secret",
    60020: "this address is not in the application's trusted IP list",
}
"""The sender refused, whatever it sends (item 111's 401/403): retried, never dead-lettered: a
rotation's alerts go out once the new credential reaches the pod."""
HINTS: dict[int, str] = {
    40056: "agent_id is not valid",
    81013: "no recipient (to_user / to_party / to_tag) is valid",
    40058: "the message is longer than WeCom accepts (lower max_message_bytes)",
    44004: "the message is empty",
    40008: "the message type is not valid",
}


class WeComSink(AlertSink[WeComOptions]):
    """WeCom group robot or application messages: digests of Warning events, rate-limited."""

    options_model = WeComOptions
    description = (
        "WeChat Work (WeCom) robot or application messages: rate-limited digests of (Warning) events"
    )
    robot: ClassVar[str] = "WeCom"
    hard_max_bytes: ClassVar[int] = 4096

    def __init__(self, options: WeComOptions, context: SinkContext, *, clock: Clock | None = None) -> None:
        super().__init__(options, context, clock=clock)
        self._token: str | None = None
        self._token_expires = 0.0
        self._token_refresh_at = 0.0
        # The URL's user info too (an authenticating egress gateway): an error may quote the URL.
        self._url_secrets = (credentials(urls=[options.url]) if options.url else []) + self.proxy_secrets

    # -------------------------------------------------------------- shape

    @property
    def msg_type(self) -> str:
        return self.options.msg_type or ("text" if self.options.app else "markdown")

    @property
    def max_bytes(self) -> int:
        # Robot: markdown content ≤ 4096 bytes, text ≤ 2048; application API: ≤ 2048 either way.
        limit = 4096 if (self.msg_type == "markdown" and not self.options.app) else 2048
        return min(self.options.max_message_bytes or limit, limit)

    def _secrets(self) -> list[str]:
        o = self.options
        return [
            s
            for s in (
                o.key.get_secret_value() if o.key else "",
                o.corp_secret.get_secret_value() if o.corp_secret else "",
                self._token or "",
            )
            if s
        ] + self._url_secrets

    def redact(self, text: str) -> str:
        return _TOKENISH.sub(r"\1=****", scrub(text, self._secrets()))

    def robot_identity(self) -> tuple[str, tuple[str, ...]]:
        o = self.options
        if o.app:
            # WeCom paces an application's messages (per recipient, by its documentation; not
            # checked from here): entries of one application share its minute, whoever they
            # address, the cautious reading.
            return "corp_id and agent_id", ("app", robot_address(self._api("")), o.corp_id, str(o.agent_id))
        assert o.key is not None
        return "URL and key", ("robot", robot_address(o.url or DEFAULT_ROBOT_URL), o.key.get_secret_value())

    def mention_line(self, digest: Digest) -> str:
        if self.options.app:
            return ""  # recipients are to_user / to_party / to_tag
        _mobiles, users, _at_all = self.mentions(digest)
        if self.msg_type == "markdown":
            # Markdown mentions are <@userid> in the content (mobiles and @all need msg_type=text).
            return " ".join(f"<@{u}>" for u in users)
        return ""  # text: mentioned_list / mentioned_mobile_list

    def payload(self, title: str, text: str, digest: Digest) -> dict[str, Any]:
        kind = self.msg_type
        if self.options.app:
            o = self.options
            body: dict[str, Any] = {
                "touser": "|".join(o.to_user),
                "toparty": "|".join(o.to_party),
                "totag": "|".join(o.to_tag),
                "msgtype": kind,
                "agentid": o.agent_id,
                kind: {"content": text},
                "safe": 0,
            }
            return body
        if kind == "text":
            mobiles, users, at_all = self.mentions(digest)
            content: dict[str, Any] = {"content": text}
            if users or at_all:
                content["mentioned_list"] = users + (["@all"] if at_all else [])
            if mobiles:
                content["mentioned_mobile_list"] = mobiles
            return {"msgtype": "text", "text": content}
        return {"msgtype": "markdown", "markdown": {"content": text}}

    # -------------------------------------------------------------- URLs and token

    def _robot_url(self) -> str:
        assert self.options.key is not None
        parts = urlsplit(self.options.url or DEFAULT_ROBOT_URL)
        query = [
            *parse_qsl(parts.query, keep_blank_values=True),
            ("key", self.options.key.get_secret_value()),
        ]
        return urlunsplit(parts._replace(query=urlencode(query)))

    def _api(self, path: str, **query: str) -> str:
        parts = urlsplit(self.options.url or DEFAULT_API)
        return urlunsplit((parts.scheme, parts.netloc, path, urlencode(query), ""))

    async def _get_token(self, *, force: bool = False) -> str | Delivery:
        """A valid access token, fetched when missing, near its end, or ``force``d; or why not."""
        now = self.clock.now()
        if self._token is not None and not force and now < self._token_refresh_at:
            return self._token
        assert self.options.corp_secret is not None
        url = self._api(
            "/cgi-bin/gettoken",
            corpid=self.options.corp_id,
            corpsecret=self.options.corp_secret.get_secret_value(),
        )
        async with self.session().get(url, allow_redirects=False, **self.request_options()) as resp:
            status = resp.status
            if status != 200:  # a gateway's: its status says it all, its body is never read
                # A gateway's 429/503 says how long: retried at the engine's backoff, the alert used
                # up retry_max_attempts within seconds (as DingTalk and every HTTP sink, honoured).
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                return self.http_failure("WeCom gettoken", status, retry_after, resp.headers.get("Location"))
            # To its end (one read returned what had arrived: a reply in two chunks was no reply).
            raw, cut, unreadable = await self.read_reply(resp, TOKEN_ANSWER_BYTES)
        if unreadable is not None:
            return Delivery(
                "retry", f"WeCom gettoken answered HTTP 200 but its reply could not be read ({unreadable})"
            )
        try:
            if cut:  # longer than any reply of WeCom's: a front's page, never parsed in part
                raise ValueError("longer than WeCom's reply")
            reply = orjson.loads(raw)
            code = int(reply.get("errcode", 0))
            msg = self.redact(str(reply.get("errmsg", "")))
        except (orjson.JSONDecodeError, TypeError, ValueError, AttributeError):
            return Delivery("retry", "WeCom gettoken answered something that is not its JSON reply")
        if code != 0:
            return self._refused("gettoken", code, msg)
        token = reply.get("access_token")
        expires_in = reply.get("expires_in")
        if not isinstance(token, str) or not token or not isinstance(expires_in, int) or expires_in <= 0:
            return Delivery("retry", "WeCom gettoken reply has no access_token / expires_in")
        now = self.clock.now()
        same = token == self._token
        self._token = token
        self._token_expires = now + expires_in
        # Refresh ahead of the end; while a token is valid WeCom hands out the same one again, so after
        # that happened keep it until it really ends (or the API says 42001).
        margin = min(300.0, expires_in / 4)
        self._token_refresh_at = self._token_expires if same else self._token_expires - margin
        return token

    # -------------------------------------------------------------- lifecycle and delivery

    def probe_url(self) -> str | None:
        if self.options.app:
            return None  # start() fetched an access token: reached, and the credentials proven
        parts = urlsplit(self.options.url or DEFAULT_ROBOT_URL)
        return urlunsplit(parts._replace(query="", fragment=""))

    async def start(self) -> None:
        await super().start()
        if self.options.app:
            where = redact_url(self._api(""))
            try:
                got = await self._get_token(force=True)
            except aiohttp.ClientHttpProxyError as exc:
                # The proxy answered the CONNECT: its status alone, with what to check (the text
                # quotes the proxy's URL with its password, encoded as yarl writes it).
                refused = self.http_failure("its proxy (CONNECT)", exc.status).reason
                raise SinkError(f"{self.context.name}: cannot reach WeCom at {where}: {refused}") from None
            except Exception as exc:  # unreachable at boot: say where, never with the secret
                raise SinkError(
                    f"{self.context.name}: cannot reach WeCom at {where}: {self.redact(str(exc))}"
                ) from None
            if isinstance(got, Delivery):
                raise SinkError(f"{self.context.name}: {got.reason}")

    def _token_valid(self, now: float) -> bool:
        return self._token is not None and now < self._token_expires

    async def prepare(self) -> Delivery | None:
        """Application API: a token near its end (or ended, or refused) is renewed before the send
        waits for the rate limiter. Renewed between that wait and the message, a send could make
        four requests (gettoken, message/send, and after a 42001 both again) on a budget of one."""
        now = self.clock.now()
        if not self.options.app or (self._token_valid(now) and now < self._token_refresh_at):
            return None
        try:
            got = await self._get_token(force=True)
        except aiohttp.ClientHttpProxyError as exc:  # the proxy refused the tunnel: its status only
            got = self.http_failure("WeCom's proxy (CONNECT)", exc.status)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            detail = self.redact(str(exc)) or type(exc).__name__
            got = Delivery("retry", f"WeCom unreachable: {type(exc).__name__}: {detail}")
        if not isinstance(got, Delivery) or self._token_valid(self.clock.now()):
            return Delivery("ok")  # renewed, or renewing early failed and the token still serves
        # No token to send with. Retried, never rejected: a token refused says nothing of the alerts.
        return got if got.kind == "retry" else Delivery("retry", got.reason, cause=got.cause)

    def _in_time(self, until: float) -> bool:
        return self.clock.now() + self.options.request_timeout <= until

    async def deliver(self, title: str, text: str, digest: Digest, *, until: float) -> Delivery:
        body = orjson.dumps(self.payload(title, text, digest))
        if not self.options.app:
            return await self._post(self._robot_url(), body)
        # Its first request the send started within its budget (``AlertSink._flush``); each further
        # one only if it can end within it too.
        made = 0
        for attempt in (1, 2):
            token = self._token
            if attempt == 2 or token is None or not self._token_valid(self.clock.now()):
                if made and not self._in_time(until):
                    return self.out_of_time("Fetching a new WeCom access token")
                got = await self._get_token(force=True)
                made += 1
                if isinstance(got, Delivery):
                    return got
                token = got
            if made and not self._in_time(until):
                return self.out_of_time("Sending with a new WeCom access token")
            result = await self._post(self._api("/cgi-bin/message/send", access_token=token), body)
            made += 1
            if result.cause != "token":
                return result
            self._token_expires = 0.0  # refused: a new one, now or before the next send's wait
        return Delivery("retry", "WeCom refused a freshly fetched access token; will try again")

    async def _post(self, url: str, body: bytes) -> Delivery:
        headers = {"Content-Type": "application/json; charset=utf-8"}
        # Redirects are not followed: a 301/302 would turn the POST into a GET (aiohttp's default).
        async with self.session().post(
            url, data=body, headers=headers, allow_redirects=False, **self.request_options()
        ) as resp:
            status = resp.status
            if status != 200:  # a gateway's: its status says it all, its body is never read
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))  # as gettoken's
                return self.http_failure("WeCom", status, retry_after, resp.headers.get("Location"))
            # To its end: one read returned what had arrived, and a reply in two chunks was "not its
            # reply", so an accepted alert was sent (and paged) again, and a 45009 taken no pause for.
            raw, cut, unreadable = await self.read_reply(resp, ANSWER_BYTES)
        if unreadable is not None:
            return unread_reply("WeCom", unreadable)
        try:
            if cut:  # longer than any reply of WeCom's: a front's page, never parsed in part
                raise ValueError("longer than WeCom's reply")
            reply = orjson.loads(raw)
            code = int(reply["errcode"])
            msg = self.redact(str(reply.get("errmsg", "")))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            snippet = self.redact(raw.decode("utf-8", "replace"))[:120]  # whole: a cut token stays hidden
            return Delivery("retry", f"WeCom answered something that is not its JSON reply: {snippet!r}")
        if code == 0:
            invalid = {k: reply.get(k) for k in ("invaliduser", "invalidparty", "invalidtag") if reply.get(k)}
            if invalid and "invalid-recipients" not in self._logged:
                self._logged.add("invalid-recipients")
                self.log.warning("%s: WeCom skipped invalid recipients %s", self.context.name, invalid)
            return Delivery("ok")
        if code in TOKEN_EXPIRED and self.options.app:
            return Delivery("retry", f"WeCom access token refused: errcode {code} ({msg})", cause="token")
        return self._refused("message/send" if self.options.app else "webhook", code, msg)

    def _refused(self, what: str, code: int, msg: str) -> Delivery:
        said = f"errcode {code} ({msg})"
        if code == 45009 or code == 45011:
            return Delivery("retry", f"WeCom says api freq out of limit: {said}", too_fast=True)
        if code in RETRYABLE:
            return Delivery("retry", f"WeCom is busy: {said}")
        if code in REFUSED:
            return Delivery(
                "retry", f"WeCom {what} refused our request: {said}: {REFUSED[code]}", refused=True
            )
        reason = f"WeCom {what} refused the message: {said}: {HINTS.get(code, 'permanent error')}"
        return Delivery("reject", reason, cause=f"{what}:{code}:{re.split(r'[,;]', msg, maxsplit=1)[0]}")
