"""Kubernetes access through kubernetes-asyncio: in-cluster service account, kubeconfig and context,
exec credential plugins with token refresh. Requests are raw (bytes in, bytes out): no generated
model objects on the hot path."""

from __future__ import annotations

import base64
import binascii
import codecs
import logging
import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import aiohttp
import yaml

from eventrouter.body_prefix import excerpt
from eventrouter.scrub import credentials, scrub
from eventrouter.source.kube_import import load

if TYPE_CHECKING:
    from kubernetes_asyncio.client.api_client import ApiClient
    from kubernetes_asyncio.client.configuration import Configuration

__all__ = ["ApiError", "KubeClient", "connect"]

log = logging.getLogger(__name__)


class ApiError(Exception):
    """A non-2xx answer from the API server, with its Status reason and code."""

    def __init__(self, status: int, reason: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        self.retry_after = retry_after


class KubeAccessError(ValueError):
    """No way to reach the API server was configured, or its credentials cannot be read: a
    configuration error (exit code 2), named with the file or setting at fault."""


_USER_AGENT = "eventrouter"


class KubeClient:
    """A thin wrapper over kubernetes_asyncio's ApiClient for raw GET/streaming requests."""

    def __init__(self, api: ApiClient, *, describe: str) -> None:
        self.api = api
        self.describe = describe

    async def request(
        self,
        method: str,
        path: str,
        query: Sequence[tuple[str, str]] = (),
        *,
        body: Any = None,
        timeout: aiohttp.ClientTimeout | None = None,
        content_type: str | None = None,
    ) -> aiohttp.ClientResponse:
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        resp: aiohttp.ClientResponse = await self.api.call_api(
            path,
            method,
            query_params=list(query),
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
            _preload_content=False,
            _request_timeout=timeout or aiohttp.ClientTimeout(total=60),
        )
        return resp

    def own_connections(self) -> KubeClient:
        """The same API server and credentials over a connection pool of its own: for the lease and
        the checkpoint ConfigMap. Each watch holds one pooled connection for as long as it lasts;
        sharing their pool, a lease renewal waited behind 100 watches (kubernetes-asyncio's default
        size) until the lease was lost, and the ConfigMap was never written (item 186)."""
        api = type(self.api)(configuration=self.api.configuration)
        api.user_agent = _USER_AGENT
        return KubeClient(api, describe=self.describe)

    async def close(self) -> None:
        await self.api.close()


def failure_text(exc: BaseException) -> str:
    """A request's failure as a log can say it: a timeout (asyncio's TimeoutError has no text) and
    other errors without a message are named, not logged as an empty reason."""
    text = str(exc)
    if text:
        return text
    return "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__


ERROR_BODY_BYTES = 64 * 1024
"""Most of an error answer's body that is read: any Status kube-apiserver writes fits. A proxy's error
page is quoted from its start and the rest left unread: read whole, a 300 MB one took the router
from 57 to 751 MiB at every watch open (its chart's limit is 256 MiB)."""
QUOTED = 300
"""Bytes of a body that is not a Status quoted in the error."""
ERROR_BODY_SECONDS = 10.0
"""Most time an error answer's body is read for: the API server writes its Status at once. A body
that trickled held the watcher up to the read timeout (330 s) a chunk."""


async def error_body(resp: aiohttp.ClientResponse) -> tuple[bytes, bool]:
    """At most ``ERROR_BODY_BYTES`` of a non-2xx answer's body, and whether there was more (then the
    connection is closed: the rest is never read). Raises the answer's ApiError, its status kept, when
    the body cannot be read within ``ERROR_BODY_SECONDS``: a gateway cutting it off made a 410 a
    broken connection (never relisted) and a 401 a warning."""
    body = await excerpt(resp, ERROR_BODY_BYTES, ERROR_BODY_SECONDS)
    if body.unreadable is not None:
        resp.close()  # the rest of it is not read: the connection cannot be reused
        message = f"its body could not be read: {body.unreadable}"
        raise ApiError(resp.status, resp.reason or "", message, _retry_after(resp))
    if body.more:
        resp.close()
    return body.data, body.more


def api_error(resp: aiohttp.ClientResponse, body: bytes, cut: bool) -> ApiError:
    """The ApiError of a non-2xx answer whose body (its prefix, ``cut``) was read by ``error_body``,
    the request's credentials scrubbed out of what it quotes (``answer_text``)."""
    import orjson

    partial = len(body) > QUOTED
    reason, message = resp.reason or "", _quoted(body[:QUOTED], cut=partial)
    if not cut:
        try:
            status = orjson.loads(body)
            if isinstance(status, dict):
                reason = str(status.get("reason") or reason)
                if status.get("message"):
                    message, partial = str(status["message"]), False
        except orjson.JSONDecodeError:
            pass
    message = answer_text(resp, message, cut=partial)
    if cut:
        message += f" (the first {QUOTED} bytes of a body over {ERROR_BODY_BYTES >> 10} KiB, not read on)"
    return ApiError(resp.status, answer_text(resp, reason), message, _retry_after(resp))


def _quoted(start: bytes, *, cut: bool) -> str:
    """``start`` decoded; ``cut``: it was cut from a longer body, and a character it cut in two is
    dropped. As U+FFFD it ended a credential cut off there, whose first characters no cut-off check
    then matched (a non-ASCII password's kept in the log)."""
    return codecs.getincrementaldecoder("utf-8")("replace").decode(start, final=not cut)


def answer_text(resp: aiohttp.ClientResponse, text: str, *, cut: bool = False) -> str:
    """``text`` from an answer to ``resp``'s request (its Status message, its body's start) with the
    credentials that request carried replaced by ``****``: a gateway or auth proxy in front of the API
    server may quote the Authorization header it refused, and the watcher logs its error at every
    attempt (item 300; the sinks' error answers are scrubbed so since item 88). ``cut``: ``text`` was
    cut from something longer, and a credential cut off at its end is masked too."""
    return scrub(text, sent_credentials(resp), partial=cut)


def sent_credentials(resp: aiohttp.ClientResponse) -> list[str]:
    """The credentials ``resp``'s request carried, in the forms ``scrub`` looks for: its Authorization
    header as sent (the token of that request: a service-account token is re-read as it rotates, an
    exec plugin's renewed), its token, and a Basic one's ``user:password`` and password. Those of 1-3
    characters are left (no secret, and masking them garbled every message). Not the user name alone:
    no secret (kube-apiserver names it in every RBAC denial), and masked everywhere it hid who was
    refused and, a common word, the API's own words (``User "****" cannot list resource "****"``)."""
    header = resp.request_info.headers.get("Authorization", "")
    scheme, _, token = header.strip().partition(" ")
    sent = [header, token.strip()]
    if scheme.lower() == "basic":
        try:
            user, _, password = base64.b64decode(token.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            user = password = ""
        sent += [f"{user}:{password}", password]
    return credentials(sent=sent) if header else []


def _retry_after(resp: aiohttp.ClientResponse) -> float | None:
    if "Retry-After" not in resp.headers:
        return None
    try:
        retry_after = float(resp.headers["Retry-After"])
    except ValueError:
        return None
    if not 0 <= retry_after < math.inf:
        return None  # "nan", "inf", negative: no usable advice
    return retry_after


async def raise_for_status(resp: aiohttp.ClientResponse) -> None:
    if 200 <= resp.status < 300:
        return
    body, cut = await error_body(resp)
    resp.release()
    raise api_error(resp, body, cut)


SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"


async def connect(
    *,
    kubeconfig: str | None = None,
    context: str | None = None,
    service_account_dir: str = SERVICE_ACCOUNT,
    connections: int = 0,
) -> KubeClient:
    """In-cluster config when running in a pod and no kubeconfig is given, else the kubeconfig.
    KubeAccessError when neither is there or its files cannot be read. ``connections``: how many
    requests may be open at once (one per watch, for as long as it lasts, and the lists), at least
    kubernetes-asyncio's default of 100: past it, a namespace's watch waited for another to end."""
    client, config = load()
    configuration = client.Configuration()
    configuration.connection_pool_maxsize = max(configuration.connection_pool_maxsize or 100, connections)
    if kubeconfig is None and context is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        # The loader re-reads the projected service-account token periodically, so rotation works.
        incluster = config.incluster_config.InClusterConfigLoader(
            token_filename=os.path.join(service_account_dir, "token"),
            cert_filename=os.path.join(service_account_dir, "ca.crt"),
        )
        try:
            incluster.load_and_set(configuration)
        except (OSError, config.ConfigException) as exc:
            raise KubeAccessError(
                f"in-cluster service account ({service_account_dir}): {_reason(exc)}"
            ) from None
        describe = "in-cluster service account"
    else:
        files, shown, current = _kubeconfig_files(kubeconfig)
        kube_config = config.kube_config
        loader: Any = None
        try:
            # What load_kube_config does, with the loader kept for the error message.
            merged = kube_config.KubeConfigMerger(kube_config.ENV_KUBECONFIG_PATH_SEPARATOR.join(files))
            loader = kube_config.KubeConfigLoader(
                config_dict=merged.config, config_base_path=None, active_context=context or current
            )
            await loader.load_and_set(configuration)
        except (OSError, config.ConfigException) as exc:
            raise KubeAccessError(
                f"kubeconfig {shown}: {_exec_not_found(loader, exc) or _reason(exc)}"
            ) from None
        describe = f"kubeconfig {shown}" + (f" context {context}" if context else "")
        user = getattr(loader, "_user", None)  # None: a context without a user (kubectl proxy)
        if user is not None and "exec" in user:
            # Exec credential plugins hand out short-lived tokens: re-run the plugin when it expires.
            async def refresh(conf: Configuration) -> None:
                try:
                    await loader.load_from_exec_plugin()
                except (config.ConfigException, RuntimeError, OSError) as exc:
                    # One failed run (an STS or metadata-server outage) fails this request only: the
                    # caller retries with backoff, as for an API server that cannot be reached.
                    missing = _exec_not_found(loader, exc)
                    reason = (
                        f"kubeconfig {shown}: {missing}"
                        if missing
                        else f"the exec credential plugin of {shown} failed: {exc}"
                    )
                    raise ApiError(0, "CredentialPluginFailed", reason) from None
                if getattr(loader, "token", None):
                    conf.api_key["BearerToken"] = loader.token

            configuration.refresh_api_key_hook = refresh
    api = client.ApiClient(configuration=configuration)
    api.user_agent = _USER_AGENT
    log.info("kubernetes API %s via %s", configuration.host, describe)
    return KubeClient(api, describe=describe)


def _kubeconfig_files(kubeconfig: str | None) -> tuple[list[str], str, str | None]:
    """The kubeconfig files to merge, how to name them, and the current context they choose.

    As kubectl: ``--kubeconfig`` is one file; ``$KUBECONFIG`` may list several (``:``-separated),
    of which those that do not exist or are empty are skipped; a name (cluster, user, context) and
    ``current-context`` are taken from the first file that sets them. (kubernetes-asyncio's merge
    lets the last file's ``current-context`` win: another cluster than the one kubectl shows.)"""
    if kubeconfig:
        paths = [kubeconfig]
    elif os.environ.get("KUBECONFIG"):
        paths = [p for p in os.environ["KUBECONFIG"].split(os.pathsep) if p]
    else:
        paths = ["~/.kube/config"]
    files: list[str] = []
    current: str | None = None
    for path in paths:
        full = os.path.expanduser(path)
        try:
            with open(full, encoding="utf-8") as f:
                doc = yaml.safe_load(f)
        except FileNotFoundError as exc:
            if kubeconfig:  # named on the command line: it must be there
                raise KubeAccessError(f"kubeconfig {path}: {_reason(exc)}") from None
            continue
        except OSError as exc:
            raise KubeAccessError(f"kubeconfig {path}: {_reason(exc)}") from None
        except (UnicodeDecodeError, yaml.YAMLError) as exc:
            # Where, never the line itself: it may hold a token.
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise KubeAccessError(f"kubeconfig {path}: not valid YAML{where}: {problem}") from None
        if not isinstance(doc, dict):
            if doc is None and len(paths) > 1:
                continue  # an empty file in the list
            found = "nothing" if doc is None else f"a {type(doc).__name__}"
            raise KubeAccessError(f"kubeconfig {path}: expected a kubeconfig (a mapping), found {found}")
        files.append(full)
        if current is None and doc.get("current-context"):
            current = str(doc["current-context"])
    if not files:
        if paths == ["~/.kube/config"]:
            # kubernetes-asyncio reads a missing default file as an empty config and fails on it.
            raise KubeAccessError(
                "no Kubernetes API to watch: not in a pod (KUBERNETES_SERVICE_HOST is not set) and no"
                " kubeconfig (--kubeconfig, $KUBECONFIG or ~/.kube/config); `eventrouter run --demo`"
                " runs without a cluster"
            )
        raise KubeAccessError(
            f"kubeconfig $KUBECONFIG: none of its files exists or has content ({os.environ['KUBECONFIG']})"
        )
    shown = paths[0] if len(files) == 1 and len(paths) == 1 else ", ".join(files)
    return files, shown, current


def _exec_not_found(loader: Any, exc: Exception) -> str | None:
    """What to say when ``exc`` is the exec credential plugin's command not being there (else None):
    "cannot read aws-iam-authenticator" named no file the user could look for."""
    user = getattr(loader, "_user", None)
    if not isinstance(exc, FileNotFoundError) or user is None or "exec" not in user:
        return None
    spec = getattr(user["exec"], "value", None)
    command = str(spec.get("command") or "") if isinstance(spec, dict) else ""
    if not command or exc.filename != command:
        return None
    if os.sep in command:
        return f"the exec credential plugin command {command!r} does not exist"
    return (
        f"the exec credential plugin command {command!r} is not found on PATH ({os.environ.get('PATH', '')}):"
        " install it, or give its full path in the kubeconfig (users[].user.exec.command)"
    )


def _reason(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.filename:
        return f"cannot read {exc.filename}: {exc.strerror}"
    return str(exc)
