"""FakeApiServer keeps the kube-apiserver 1.24 contract: wire format from the recorded real traffic,
resourceVersion/paging/watch semantics, errors as real Status bodies, auth, faults, Leases, ConfigMaps."""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from kubernetes_asyncio import client as kclient
from kubernetes_asyncio import config as kconfig
from kubernetes_asyncio import watch as kwatch
from kubernetes_asyncio.client.exceptions import ApiException

from eventrouter.testing import event_object, recorded_list, recorded_watch
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.factories import _data

TOKEN = "t0ken"
EVENTS = "/api/v1/events"
LEASES = "/apis/coordination.k8s.io/v1/namespaces/default/leases"
CONFIGMAPS = "/api/v1/namespaces/default/configmaps"


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(token=TOKEN, bookmark_interval=0.1) as server:
        yield server


@pytest.fixture
async def http(api: FakeApiServer) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(api.url, headers={"Authorization": f"Bearer {TOKEN}"}) as session:
        yield session


async def get_json(http: aiohttp.ClientSession, path: str, **params: str) -> tuple[int, Any]:
    async with http.get(path, params=params) as resp:
        return resp.status, orjson.loads(await resp.read())


async def read_watch(
    http: aiohttp.ClientSession, path: str, count: int | None = None, **params: str
) -> list[dict[str, Any]]:
    """Watch lines until ``count`` were read or the server ended the stream."""
    out: list[dict[str, Any]] = []
    async with http.get(path, params={"watch": "1", **params}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "application/json"
        async for line in resp.content:
            out.append(orjson.loads(line))
            if count is not None and len(out) >= count:
                break
    return out


def without_rv(obj: dict[str, Any]) -> dict[str, Any]:
    copy: dict[str, Any] = orjson.loads(orjson.dumps(obj))
    copy["metadata"].pop("resourceVersion", None)
    return copy


def occurrences(lines: list[dict[str, Any]]) -> int:
    seen: dict[str, int] = {}
    total = 0
    for line in lines:
        if line["type"] not in ("ADDED", "MODIFIED"):
            continue
        obj = line["object"]
        number = (obj.get("series") or {}).get("count") or obj.get("count") or 1
        if number > seen.get(obj["metadata"]["uid"], 0):
            total += 1
            seen[obj["metadata"]["uid"]] = number
    return total


# --- discovery -------------------------------------------------------------------------------------


async def test_discovery_endpoints_answer_like_a_1_24_server(
    api: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    status, version = await get_json(http, "/version")
    assert status == 200 and (version["major"], version["minor"]) == ("1", "24")
    status, apis = await get_json(http, "/api")
    assert status == 200 and apis["kind"] == "APIVersions" and apis["versions"] == ["v1"]
    status, groups = await get_json(http, "/apis")
    assert [g["name"] for g in groups["groups"]] == ["coordination.k8s.io"]
    status, body = await get_json(http, "/api/v1/nodes")
    assert status == 404 and body["reason"] == "NotFound"


# --- list ------------------------------------------------------------------------------------------


async def test_list_is_sorted_like_etcd_keys_and_items_omit_kind(
    api: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    for ns, name in [("b", "x"), ("a-b", "z"), ("a", "y"), ("a", "b")]:
        api.create_event(event_object(namespace=ns, name=name))
    status, body = await get_json(http, EVENTS)
    assert status == 200
    assert (body["kind"], body["apiVersion"]) == ("EventList", "v1")
    assert body["metadata"] == {"resourceVersion": str(api.resource_version)}
    # "/registry/events/a-b/z" < "/registry/events/a/b" because "-" sorts before "/".
    assert [(i["metadata"]["namespace"], i["metadata"]["name"]) for i in body["items"]] == [
        ("a-b", "z"),
        ("a", "b"),
        ("a", "y"),
        ("b", "x"),
    ]
    assert all("kind" not in i and "apiVersion" not in i for i in body["items"])
    assert all(isinstance(i["metadata"]["resourceVersion"], str) for i in body["items"])


async def test_paging_reproduces_the_recorded_first_page(
    api: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    await api.load_recording(_data("watch-core-v1.jsonl").splitlines())
    recorded = orjson.loads(_data("list-core-v1-page1-limit20.json"))
    status, page = await get_json(http, EVENTS, limit="20")
    assert status == 200
    assert set(page) == set(recorded) and set(page["metadata"]) == set(recorded["metadata"])
    assert page["metadata"]["remainingItemCount"] == recorded["metadata"]["remainingItemCount"] == 72
    assert [without_rv(i) for i in page["items"]] == [without_rv(i) for i in recorded["items"]]

    def token(value: str) -> dict[str, Any]:
        decoded: dict[str, Any] = orjson.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
        return decoded

    ours, theirs = token(page["metadata"]["continue"]), token(recorded["metadata"]["continue"])
    assert ours == {**theirs, "rv": api.resource_version}
    # Same bytes as the Go encoder when the revision is the same.
    same_rv = (
        base64.urlsafe_b64encode(orjson.dumps({**theirs, "rv": 508}).replace(b"\x00", b"\\u0000"))
        .rstrip(b"=")
        .decode()
    )
    assert same_rv == recorded["metadata"]["continue"]
    # The whole list equals the recorded `kubectl get events -A -o json` (92 events) up to what kubectl
    # changes: it adds kind/apiVersion to items and drops managedFields.
    status, full = await get_json(http, EVENTS)

    def as_kubectl(item: dict[str, Any]) -> dict[str, Any]:
        item = {"kind": "Event", "apiVersion": "v1", **without_rv(item)}
        item["metadata"].pop("managedFields", None)
        return item

    assert [as_kubectl(i) for i in full["items"]] == [without_rv(i) for i in recorded_list()["items"]]


async def test_all_pages_are_served_at_the_first_pages_revision(
    api: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    for i in range(25):
        api.create_event(event_object(name=f"ev-{i:02d}"))
    status, page = await get_json(http, EVENTS, limit="10")
    list_rv = page["metadata"]["resourceVersion"]
    names = [i["metadata"]["name"] for i in page["items"]]
    # Writes between pages must not show up: the list is a consistent snapshot.
    api.delete_event("default", "ev-15")
    api.create_event(event_object(name="ev-99"))
    api.bump("default", "ev-20")
    while "continue" in page["metadata"]:
        assert page["metadata"]["remainingItemCount"] == 25 - len(names)
        status, page = await get_json(http, EVENTS, limit="10", **{"continue": page["metadata"]["continue"]})
        assert status == 200 and page["metadata"]["resourceVersion"] == list_rv
        names += [i["metadata"]["name"] for i in page["items"]]
        assert all(i["metadata"].get("resourceVersion") != str(api.resource_version) for i in page["items"])
    assert names == [f"ev-{i:02d}" for i in range(25)]
    assert "remainingItemCount" not in page["metadata"]


async def test_continue_token_after_compaction_answers_410_expired(
    api: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    for i in range(5):
        api.create_event(event_object(name=f"ev-{i}"))
    _, page = await get_json(http, EVENTS, limit="2")
    api.create_event(event_object(name="ev-new"))
    api.compact()
    status, body = await get_json(http, EVENTS, limit="2", **{"continue": page["metadata"]["continue"]})
    assert status == 410
    fresh = body["metadata"].pop("continue")
    assert body == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": "The provided continue parameter is too old to display a consistent list result. You can "
        "start a new list without the continue parameter, or use the continue token in this response to "
        "retrieve the remainder of the results. Continuing with the provided token results in an "
        "inconsistent list - objects that were created, modified, or deleted between the time the first "
        "chunk was returned and now may show up in the list.",
        "reason": "Expired",
        "code": 410,
    }
    # The fresh token (rv -1) continues at the latest revision from the same key.
    status, rest = await get_json(http, EVENTS, **{"continue": fresh})
    assert status == 200
    assert [i["metadata"]["name"] for i in rest["items"]] == ["ev-2", "ev-3", "ev-4", "ev-new"]


async def test_list_resource_version_semantics(api: FakeApiServer, http: aiohttp.ClientSession) -> None:
    for i in range(5):
        api.create_event(event_object(name=f"ev-{i}"))
    old_rv = api.resource_version
    api.create_event(event_object(name="ev-5"))
    # resourceVersion=0 is served from the watch cache: everything, limit ignored (1.24).
    _, body = await get_json(http, EVENTS, resourceVersion="0", limit="2")
    assert len(body["items"]) == 6 and "continue" not in body["metadata"]
    # An exact past revision with a limit is read at that revision.
    _, body = await get_json(http, EVENTS, resourceVersion=str(old_rv), limit="10")
    assert [i["metadata"]["name"] for i in body["items"]] == [f"ev-{i}" for i in range(5)]
    assert body["metadata"]["resourceVersion"] == str(old_rv)
    api.compact()
    status, body = await get_json(http, EVENTS, resourceVersion=str(old_rv), limit="10")
    assert (status, body["reason"], body["message"]) == (
        410,
        "Expired",
        "The resourceVersion for the provided list is too old.",
    )
    status, body = await get_json(http, EVENTS, resourceVersion="5", **{"continue": "x"})
    assert (status, body["message"]) == (
        400,
        "specifying resource version is not allowed when using continue",
    )


TOO_LARGE_CAUSE = {"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}
FUTURE = "Internal error occurred: etcdserver: mvcc: required revision is a future revision"


def too_large(rv: int, current: int, retry: int | None = None) -> dict[str, Any]:
    """storage.NewTooLargeResourceVersionError as kube-apiserver 1.24 writes it."""
    details: dict[str, Any] = {"causes": [TOO_LARGE_CAUSE]}
    if retry is not None:
        details["retryAfterSeconds"] = retry
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": f"Timeout: Too large resource version: {rv}, current: {current}",
        "reason": "Timeout",
        "details": details,
        "code": 504,
    }


@pytest.mark.parametrize("watch_cache", [True, False])
async def test_a_paged_list_not_older_than_a_revision_ahead_of_the_store_answers_504(
    watch_cache: bool,
) -> None:
    """limit > 0 at a resourceVersion other than 0 goes to etcd (cacher.shouldDelegateList) whose
    validateMinimumResourceVersion answers at once, with no retry advice; Exact, or a limit without a
    match (the legacy exact read), asks etcd for that revision: 500 future revision."""
    async with FakeApiServer(watch_cache=watch_cache) as api, aiohttp.ClientSession(api.url) as http:
        api.create_event(event_object(name="a"))
        current = api.resource_version
        ahead = current + 50
        params = {"limit": "1", "resourceVersion": str(ahead), "resourceVersionMatch": "NotOlderThan"}
        async with http.get(EVENTS, params=params) as resp:
            assert resp.status == 504 and "Retry-After" not in resp.headers
            assert orjson.loads(await resp.read()) == too_large(ahead, current)
        for extra in ({"limit": "1", "resourceVersionMatch": "Exact"}, {"resourceVersionMatch": "Exact"}):
            status, body = await get_json(http, EVENTS, resourceVersion=str(ahead), **extra)
            assert (status, body["message"]) == (500, FUTURE)
        status, body = await get_json(http, EVENTS, resourceVersion=str(ahead), limit="1")
        assert (status, body["message"]) == (500, FUTURE)
        # At the store's own revision it is an ordinary page.
        params["resourceVersion"] = str(current)
        status, body = await get_json(http, EVENTS, **params)
        assert status == 200 and body["metadata"]["resourceVersion"] == str(current)


async def test_an_unpaged_list_ahead_of_the_store_without_a_watch_cache_answers_504_at_once() -> None:
    async with FakeApiServer(watch_cache=False) as api, aiohttp.ClientSession(api.url) as http:
        current = api.resource_version
        for match in ("NotOlderThan", ""):
            status, body = await get_json(
                http, EVENTS, resourceVersion=str(current + 5), resourceVersionMatch=match
            )
            assert (status, body) == (504, too_large(current + 5, current))


async def test_the_watch_cache_waits_for_a_revision_ahead_of_it_then_answers_504_retry_after_1(
    api: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    """Served from the watch cache (no limit), a list ahead of it waits up to 3 s for the cache to
    catch up (waitUntilFreshAndBlock): answered when it does, else 504 with retryAfterSeconds 1."""
    ahead = api.resource_version + 2
    params = {"resourceVersion": str(ahead), "resourceVersionMatch": "NotOlderThan"}
    waiting = asyncio.create_task(get_json(http, EVENTS, **params))
    await api.wait_until(lambda: api.count_requests(watch=False) == 1)
    api.create_event(event_object(name="a"))
    api.create_event(event_object(name="b"))
    status, body = await waiting
    assert status == 200 and [i["metadata"]["name"] for i in body["items"]] == ["a", "b"]
    assert body["metadata"]["resourceVersion"] == str(ahead)
    params["resourceVersion"] = str(ahead + 1)
    async with http.get(EVENTS, params=params) as resp:
        assert resp.status == 504 and resp.headers["Retry-After"] == "1"
        assert orjson.loads(await resp.read()) == too_large(ahead + 1, ahead, retry=1)


# --- watch -----------------------------------------------------------------------------------------


async def test_watch_from_zero_sends_synthetic_added_then_live_changes(
    api: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    a = api.create_event(event_object(name="a"))
    api.create_event(event_object(name="b"))
    async with http.get(EVENTS, params={"watch": "true", "resourceVersion": "0"}) as resp:
        first = [orjson.loads(await resp.content.readline()) for _ in range(2)]
        assert [(x["type"], x["object"]["metadata"]["name"]) for x in first] == [
            ("ADDED", "a"),
            ("ADDED", "b"),
        ]
        assert first[0]["object"] == a
        api.bump("default", "a")
        api.delete_event("default", "b")
        live = [orjson.loads(await resp.content.readline()) for _ in range(2)]
    assert [(x["type"], x["object"]["metadata"]["name"]) for x in live] == [
        ("MODIFIED", "a"),
        ("DELETED", "b"),
    ]
    assert live[0]["object"]["count"] == 2
    assert int(live[1]["object"]["metadata"]["resourceVersion"]) == api.resource_version


async def test_replayed_recording_watched_from_before_the_load_is_the_recorded_stream(
    api: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    recorded = recorded_watch()
    before = api.resource_version
    assert await api.load_recording(recorded) == 127
    lines = await read_watch(http, EVENTS, count=127, resourceVersion=str(before), timeoutSeconds="5")
    assert [x["type"] for x in lines] == [x["type"] for x in recorded]
    assert [without_rv(x["object"]) for x in lines] == [without_rv(x["object"]) for x in recorded]
    rvs = [int(x["object"]["metadata"]["resourceVersion"]) for x in lines]
    assert rvs == sorted(rvs) and len(set(rvs)) == 127 and rvs[0] > before
    assert occurrences(lines) == occurrences(recorded) == 126


async def test_live_watch_sees_a_recording_applied_while_it_streams(
    api: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    recorded = recorded_watch()
    async with http.get(EVENTS, params={"watch": "1", "resourceVersion": str(api.resource_version)}) as resp:
        await api.wait_until(lambda: api.active_watches == 1)
        await api.load_recording(recorded)
        lines = [orjson.loads(await resp.content.readline()) for _ in recorded]
    assert [(x["type"], without_rv(x["object"])) for x in lines] == [
        (x["type"], without_rv(x["object"])) for x in recorded
    ]


async def test_watch_from_a_compacted_revision_gets_an_in_stream_410(
    api: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    api.create_event(event_object(name="a"))
    old = api.resource_version
    api.bump("default", "a")
    api.compact()
    lines = await read_watch(http, EVENTS, resourceVersion=str(old - 1))
    assert lines == [
        {
            "type": "ERROR",
            "object": {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": f"too old resource version: {old - 1} ({api.resource_version})",
                "reason": "Expired",
                "code": 410,
            },
        }
    ]


async def test_bounded_history_expires_the_oldest_revisions() -> None:
    async with FakeApiServer(history_size=5) as api, aiohttp.ClientSession(api.url) as http:
        start = api.resource_version
        for i in range(10):
            api.create_event(event_object(name=f"e{i}"))
        assert api.oldest_resource_version == start + 5
        lines = await read_watch(http, EVENTS, resourceVersion=str(start + 4))
        assert lines[0]["type"] == "ERROR" and lines[0]["object"]["code"] == 410
        lines = await read_watch(http, EVENTS, count=5, resourceVersion=str(start + 5))
        assert [x["object"]["metadata"]["name"] for x in lines] == [f"e{i}" for i in range(5, 10)]


async def test_bookmarks_carry_the_current_revision(api: FakeApiServer, http: aiohttp.ClientSession) -> None:
    api.create_event(event_object(name="a"))
    lines = await read_watch(http, EVENTS, count=3, allowWatchBookmarks="true")
    assert lines[0]["type"] == "ADDED"
    assert [x["type"] for x in lines[1:]] == ["BOOKMARK", "BOOKMARK"]
    bookmark = lines[1]["object"]
    assert bookmark["kind"] == "Event" and bookmark["apiVersion"] == "v1"
    assert bookmark["metadata"] == {"resourceVersion": str(api.resource_version), "creationTimestamp": None}
    # Without allowWatchBookmarks, none are sent.
    lines = await read_watch(http, EVENTS, timeoutSeconds="1")
    assert [x["type"] for x in lines] == ["ADDED"]


async def test_send_initial_events_ends_with_an_annotated_bookmark(
    api: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    api.create_event(event_object(name="a"))
    lines = await read_watch(
        http,
        EVENTS,
        count=2,
        sendInitialEvents="true",
        allowWatchBookmarks="true",
        resourceVersionMatch="NotOlderThan",
        resourceVersion="",
    )
    assert lines[1]["type"] == "BOOKMARK"
    assert lines[1]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}


async def test_timeout_seconds_closes_the_stream(api: FakeApiServer, http: aiohttp.ClientSession) -> None:
    started = time.monotonic()
    lines = await read_watch(http, EVENTS, timeoutSeconds="1")
    assert lines == []
    assert 0.9 <= time.monotonic() - started < 5


async def test_client_disconnect_unregisters_the_watcher(
    api: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    async with http.get(EVENTS, params={"watch": "1"}):
        await api.wait_until(lambda: api.active_watches == 1)
    # Nothing is written to the stream: the server notices the closed socket by itself.
    await api.wait_until(lambda: api.active_watches == 0, timeout=3)


async def test_a_watcher_that_falls_behind_its_buffer_is_closed() -> None:
    async with FakeApiServer(watcher_buffer=10) as api, aiohttp.ClientSession(api.url) as http:
        async with http.get(EVENTS, params={"watch": "1"}) as resp:
            await api.wait_until(lambda: api.active_watches == 1)
            for i in range(50):  # no await: the queue overflows before the stream can drain
                api.create_event(event_object(name=f"e{i}"))
            body = await resp.read()
        assert body == b""
        assert api.active_watches == 0


@pytest.mark.parametrize("watch_cache", [True, False])
async def test_a_watch_ahead_of_the_store_gets_nothing_at_or_below_its_resource_version(
    watch_cache: bool,
) -> None:
    """etcd restored from a snapshot: the store is behind a client's resourceVersion N. etcd's watch
    sends ModRevision >= N + 1 and the cacher only rv > N, so nothing written up to N comes, bookmarks
    neither (the cacher drops them too), and the first line is the change after N."""
    async with (
        FakeApiServer(watch_cache=watch_cache, bookmark_interval=0.01) as api,
        aiohttp.ClientSession(api.url) as http,
    ):
        ahead = api.resource_version + 5
        params = {"watch": "1", "resourceVersion": str(ahead), "allowWatchBookmarks": "true"}
        async with http.get(EVENTS, params=params) as resp:
            await api.wait_until(lambda: api.active_watches == 1)
            for i in range(4):
                api.create_event(event_object(name=f"below-{i}"))
            if watch_cache:  # bookmark ticks went by: a watch at the store's revision got two
                current = str(api.resource_version)
                lines = await read_watch(
                    http, EVENTS, count=2, allowWatchBookmarks="true", resourceVersion=current
                )
                assert [x["type"] for x in lines] == ["BOOKMARK", "BOOKMARK"]
            api.create_event(event_object(name="at"))  # rv N itself
            api.create_event(event_object(name="above"))
            assert api.resource_version == ahead + 1
            line = orjson.loads(await resp.content.readline())
        assert line["type"] == "ADDED" and line["object"]["metadata"]["name"] == "above"
        assert line["object"]["metadata"]["resourceVersion"] == str(ahead + 1)


# --- selectors and namespaces ----------------------------------------------------------------------


async def test_field_selectors_on_list_match_the_real_index(
    api: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    await api.load_recording(recorded_watch())
    events = api.events()
    cases: dict[str, Callable[[dict[str, Any]], bool]] = {
        "involvedObject.kind=Node": lambda e: e["involvedObject"]["kind"] == "Node",
        "type!=Normal,reason==BackOff": lambda e: e["type"] != "Normal" and e["reason"] == "BackOff",
        # "source" falls back to reportingComponent for events.k8s.io recorders (the scheduler).
        "source=default-scheduler": lambda e: e["reportingComponent"] == "default-scheduler",
        "metadata.namespace=shop,involvedObject.fieldPath!=": lambda e: (
            e["metadata"]["namespace"] == "shop" and bool(e["involvedObject"].get("fieldPath"))
        ),
    }
    for selector, predicate in cases.items():
        _, body = await get_json(http, EVENTS, fieldSelector=selector)
        expected = [e["metadata"]["name"] for e in events if predicate(e)]
        assert expected, selector
        assert [i["metadata"]["name"] for i in body["items"]] == expected, selector
    # With a selector, pages hold `limit` matches and no remainingItemCount (etcd cannot count them).
    _, page = await get_json(http, EVENTS, fieldSelector="type=Warning", limit="3")
    assert len(page["items"]) == 3 and "continue" in page["metadata"]
    assert "remainingItemCount" not in page["metadata"]
    status, body = await get_json(http, EVENTS, fieldSelector="spec.foo=bar")
    assert status == 400
    assert body == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": "field label not supported: spec.foo",
        "reason": "BadRequest",
        "code": 400,
    }
    # fields.ParseSelector trims nothing and unescapes strictly; an empty term is skipped.
    for selector, message in (
        ("type=Warning, reason=BackOff", "field label not supported:  reason"),
        ("reason=a=b", "invalid field selector: unescaped character in value: 61"),
        ("reason=a\\x", "invalid field selector: invalid escape sequence: \\x"),
    ):
        status, body = await get_json(http, EVENTS, fieldSelector=selector)
        assert (status, body["message"]) == (400, message), selector
    status, _ = await get_json(http, EVENTS, fieldSelector="type=Warning,")
    assert status == 200


async def test_watch_selector_turns_objects_leaving_it_into_deleted(
    api: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    api.create_event(event_object(name="a", reason="BackOff"))
    async with http.get(EVENTS, params={"watch": "1", "fieldSelector": "reason=BackOff"}) as resp:
        assert orjson.loads(await resp.content.readline())["type"] == "ADDED"
        api.update_event("default", "a", lambda o: {**o, "reason": "Pulled"})
        api.create_event(event_object(name="b", reason="Pulled"))
        api.update_event("default", "b", lambda o: {**o, "reason": "BackOff"})
        left = orjson.loads(await resp.content.readline())
        entered = orjson.loads(await resp.content.readline())
    assert (left["type"], left["object"]["metadata"]["name"], left["object"]["reason"]) == (
        "DELETED",
        "a",
        "BackOff",
    )
    assert (entered["type"], entered["object"]["metadata"]["name"]) == ("ADDED", "b")


async def test_label_selectors(api: FakeApiServer, http: aiohttp.ClientSession) -> None:
    api.create_event(
        event_object(name="a", metadata={"name": "a", "namespace": "default", "labels": {"app": "web"}})
    )
    api.create_event(
        event_object(name="b", metadata={"name": "b", "namespace": "default", "labels": {"app": "db"}})
    )
    api.create_event(event_object(name="c"))
    for selector, names in {
        "app=web": ["a"],
        "app!=web": ["b", "c"],
        "app": ["a", "b"],
        "!app": ["c"],
        "app in (db,web)": ["a", "b"],
    }.items():
        _, body = await get_json(http, EVENTS, labelSelector=selector)
        assert [i["metadata"]["name"] for i in body["items"]] == names, selector


async def test_namespaced_list_and_watch_see_only_their_namespace(
    api: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    for ns in ("default", "shop", "shop-2", "zzz"):
        api.create_event(event_object(namespace=ns, name=f"{ns}-a"))
        api.create_event(event_object(namespace=ns, name=f"{ns}-b"))
    _, body = await get_json(http, "/api/v1/namespaces/shop/events", limit="1")
    assert [i["metadata"]["name"] for i in body["items"]] == ["shop-a"]
    assert body["metadata"]["remainingItemCount"] == 1
    _, body = await get_json(
        http, "/api/v1/namespaces/shop/events", limit="1", **{"continue": body["metadata"]["continue"]}
    )
    assert [i["metadata"]["name"] for i in body["items"]] == ["shop-b"] and "continue" not in body["metadata"]
    async with http.get("/api/v1/namespaces/shop/events", params={"watch": "1"}) as resp:
        initial = [orjson.loads(await resp.content.readline()) for _ in range(2)]
        api.create_event(event_object(namespace="default", name="x"))
        api.create_event(event_object(namespace="shop", name="y"))
        live = orjson.loads(await resp.content.readline())
    assert [x["object"]["metadata"]["name"] for x in initial] == ["shop-a", "shop-b"]
    assert live["object"]["metadata"]["name"] == "y"


# --- store API, TTL ----------------------------------------------------------------------------------


async def test_bump_raises_count_or_series_like_the_recorders(api: FakeApiServer) -> None:
    core = api.create_event(event_object(name="core"))
    new = api.create_event(event_object(name="new", count=None, event_time="2026-01-01T00:00:00.000001Z"))
    assert core["metadata"]["uid"] and core["metadata"]["creationTimestamp"]
    bumped = api.bump("default", "core")
    assert bumped["count"] == 2 and bumped["lastTimestamp"] is not None
    assert int(bumped["metadata"]["resourceVersion"]) == api.resource_version
    first = api.bump("default", "new")
    second = api.bump("default", "new")
    assert (first["series"]["count"], second["series"]["count"]) == (2, 3)
    assert second["series"]["lastObservedTime"].endswith("Z") and "." in second["series"]["lastObservedTime"]
    assert second["metadata"]["uid"] == new["metadata"]["uid"]


async def test_ttl_deletes_events_not_written_for_ttl_seconds(
    http: aiohttp.ClientSession, api: FakeApiServer
) -> None:
    api.create_event(event_object(name="old"))
    async with http.get(EVENTS, params={"watch": "1"}) as resp:
        assert orjson.loads(await resp.content.readline())["type"] == "ADDED"
        api.ttl = 0.2
        gone = orjson.loads(await resp.content.readline())
    assert (gone["type"], gone["object"]["metadata"]["name"]) == ("DELETED", "old")
    assert api.events() == []


# --- auth ------------------------------------------------------------------------------------------


async def test_missing_or_unknown_token_gets_401(api: FakeApiServer) -> None:
    unauthorized = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": "Unauthorized",
        "reason": "Unauthorized",
        "code": 401,
    }
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        async with aiohttp.ClientSession(api.url, headers=headers) as http:
            assert await get_json(http, EVENTS) == (401, unauthorized)


async def test_forbidden_token_gets_403_with_the_rbac_message() -> None:
    user = "system:serviceaccount:x:y"
    async with (
        FakeApiServer(token=TOKEN, forbidden_tokens={"nope": user}) as api,
        aiohttp.ClientSession(api.url, headers={"Authorization": "Bearer nope"}) as http,
    ):
        status, body = await get_json(http, EVENTS)
        assert status == 403
        assert body == {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": f'events is forbidden: User "{user}" cannot list resource "events" in API group "" '
            "at the cluster scope",
            "reason": "Forbidden",
            "details": {"kind": "events"},
            "code": 403,
        }
        status, body = await get_json(http, "/api/v1/namespaces/shop/events", watch="1")
        assert body["message"].endswith(
            'cannot watch resource "events" in API group "" in the namespace "shop"'
        )
        status, body = await get_json(http, f"{LEASES}/lock")
        assert body["message"] == (
            f'leases.coordination.k8s.io "lock" is forbidden: User "{user}" cannot get resource "leases" '
            'in API group "coordination.k8s.io" in the namespace "default"'
        )
        # A narrower rule: only leases are denied.
        api.forbid("nope", user, resources=["leases"])
        assert (await get_json(http, EVENTS))[0] == 200


# --- faults ----------------------------------------------------------------------------------------


async def test_fail_next_answers_500_then_recovers(api: FakeApiServer, http: aiohttp.ClientSession) -> None:
    api.faults.fail_next(500, count=2)
    for _ in range(2):
        status, body = await get_json(http, EVENTS)
        assert (status, body["reason"], body["code"]) == (500, "InternalError", 500)
    assert (await get_json(http, EVENTS))[0] == 200
    assert api.count_requests(watch=False) == 3


async def test_fail_next_429_sends_retry_after(api: FakeApiServer, http: aiohttp.ClientSession) -> None:
    api.faults.fail_next(429, retry_after=2)
    async with http.get(EVENTS, params={"watch": "1"}) as resp:
        assert resp.status == 429 and resp.headers["Retry-After"] == "2"
        body = orjson.loads(await resp.read())
    assert body == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": "Too many requests, please try again later.",
        "reason": "TooManyRequests",
        "details": {"retryAfterSeconds": 2},
        "code": 429,
    }
    assert api.faults.pending == 0


async def test_cut_watch_sends_n_lines_then_half_a_line_and_drops(
    api: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    for i in range(4):
        api.create_event(event_object(name=f"e{i}"))
    api.faults.cut_next_watch(after_lines=2, mid_object=True)
    async with http.get(EVENTS, params={"watch": "1"}) as resp:
        assert orjson.loads(await resp.content.readline())["object"]["metadata"]["name"] == "e0"
        assert orjson.loads(await resp.content.readline())["object"]["metadata"]["name"] == "e1"
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.content.read()
    # The next watch is normal again.
    assert len(await read_watch(http, EVENTS, count=4)) == 4
    assert api.count_requests(watch=True) == 2


async def test_stall_watch_sends_headers_then_nothing(
    api: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    api.create_event(event_object(name="a"))
    api.faults.stall_next_watch(0.6)
    started = time.monotonic()
    async with http.get(EVENTS, params={"watch": "1", "allowWatchBookmarks": "true"}) as resp:
        assert resp.status == 200
        assert await resp.read() == b""
    assert time.monotonic() - started >= 0.55


async def test_malformed_line_is_injected_once(api: FakeApiServer, http: aiohttp.ClientSession) -> None:
    api.create_event(event_object(name="a"))
    api.create_event(event_object(name="b"))
    api.faults.malformed_next_watch_line(after_lines=1)
    async with http.get(EVENTS, params={"watch": "1"}) as resp:
        lines = [await resp.content.readline() for _ in range(3)]
    assert orjson.loads(lines[0])["object"]["metadata"]["name"] == "a"
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(lines[1])
    assert orjson.loads(lines[2])["object"]["metadata"]["name"] == "b"


async def test_empty_watch_closes_at_once_with_200(api: FakeApiServer, http: aiohttp.ClientSession) -> None:
    api.create_event(event_object(name="a"))
    api.faults.empty_next_watch()
    async with http.get(EVENTS, params={"watch": "1"}) as resp:
        assert resp.status == 200 and await resp.read() == b""
    assert len(await read_watch(http, EVENTS, count=1)) == 1


# --- object verbs: events, leases, configmaps --------------------------------------------------------


async def test_event_create_get_update_patch_delete(api: FakeApiServer, http: aiohttp.ClientSession) -> None:
    base = "/api/v1/namespaces/default/events"
    obj = event_object(name="e1")
    obj["metadata"].pop("resourceVersion")
    async with http.post(base, json=obj) as resp:
        assert resp.status == 201
        created = await resp.json()
    assert created["metadata"]["uid"] != obj["metadata"]["uid"]  # the server owns uid
    async with http.post(base, json=obj) as resp:
        body = await resp.json()
        assert (resp.status, body["reason"], body["message"]) == (
            409,
            "AlreadyExists",
            'events "e1" already exists',
        )
    stale = {**created, "count": 5}
    async with http.put(f"{base}/e1", json=created | {"count": 2}) as resp:
        assert resp.status == 200 and (await resp.json())["count"] == 2
    async with http.put(f"{base}/e1", json=stale) as resp:
        body = await resp.json()
        assert (resp.status, body["reason"]) == (409, "Conflict")
        assert body["message"] == (
            'Operation cannot be fulfilled on events "e1": the object has been modified; please apply your '
            "changes to the latest version and try again"
        )
    headers = {"Content-Type": "application/merge-patch+json"}
    async with http.patch(f"{base}/e1", data=b'{"count":3,"message":null}', headers=headers) as resp:
        patched = await resp.json()
        assert resp.status == 200 and patched["count"] == 3 and "message" not in patched
    headers = {"Content-Type": "application/json-patch+json"}
    ops = [{"op": "test", "path": "/count", "value": 3}, {"op": "replace", "path": "/count", "value": 4}]
    async with http.patch(f"{base}/e1", json=ops, headers=headers) as resp:
        assert (await resp.json())["count"] == 4
    async with http.delete(f"{base}/e1") as resp:
        body = await resp.json()
        assert body["status"] == "Success" and body["details"] == {
            "name": "e1",
            "kind": "events",
            "uid": created["metadata"]["uid"],
        }
    status, body = await get_json(http, f"{base}/e1")
    assert (status, body["message"], body["details"]) == (
        404,
        'events "e1" not found',
        {"name": "e1", "kind": "events"},
    )


async def test_leases_use_optimistic_concurrency(api: FakeApiServer, http: aiohttp.ClientSession) -> None:
    lease = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "lock"},
        "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15},
    }
    async with http.post(LEASES, json=lease) as resp:
        assert resp.status == 201
        created = await resp.json()
    async with http.post(LEASES, json=lease) as resp:
        body = await resp.json()
        assert (resp.status, body["reason"]) == (409, "AlreadyExists")
        assert body["message"] == 'leases.coordination.k8s.io "lock" already exists'
    mine = {**created, "spec": {**created["spec"], "holderIdentity": "b"}}
    theirs = {**created, "spec": {**created["spec"], "holderIdentity": "c"}}
    async with http.put(f"{LEASES}/lock", json=mine) as resp:
        assert resp.status == 200 and (await resp.json())["spec"]["holderIdentity"] == "b"
    async with http.put(f"{LEASES}/lock", json=theirs) as resp:  # same, now stale, resourceVersion
        body = await resp.json()
        assert (resp.status, body["reason"], body["details"]["group"]) == (
            409,
            "Conflict",
            "coordination.k8s.io",
        )
    no_rv = {**theirs, "metadata": {"name": "lock"}}
    async with http.put(f"{LEASES}/lock", json=no_rv) as resp:
        assert resp.status == 422 and (await resp.json())["reason"] == "Invalid"
    async with http.put(f"{LEASES}/other", json=no_rv | {"metadata": {"name": "other"}}) as resp:
        assert resp.status == 201  # leases allow create on update (see the test below)
    assert api.get_object("leases", "default", "lock")["spec"]["holderIdentity"] == "b"
    # Faults reach other verbs and resources when asked (a renewal that fails once).
    api.faults.fail_next(503, verbs=["update"], resource="leases")
    current = api.get_object("leases", "default", "lock")
    async with http.put(f"{LEASES}/lock", json=current) as resp:
        assert (resp.status, (await resp.json())["reason"]) == (503, "ServiceUnavailable")
    async with http.put(f"{LEASES}/lock", json=current) as resp:
        assert resp.status == 200


async def test_configmaps_patch_and_the_one_mebibyte_limit(
    api: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    async with http.post(CONFIGMAPS, json={"metadata": {"name": "ckpt"}, "data": {"a": "1"}}) as resp:
        assert resp.status == 201
    headers = {"Content-Type": "application/merge-patch+json"}
    async with http.patch(f"{CONFIGMAPS}/ckpt", json={"data": {"b": "2"}}, headers=headers) as resp:
        assert (await resp.json())["data"] == {"a": "1", "b": "2"}
    big = {"data": {"state": "x" * (1024 * 1024)}}
    async with http.patch(f"{CONFIGMAPS}/ckpt", data=io.BytesIO(orjson.dumps(big)), headers=headers) as resp:
        body = await resp.json()
    assert resp.status == 422
    assert body["message"] == 'ConfigMap "ckpt" is invalid: []: Too long: must have at most 1048576 bytes'
    assert body["reason"] == "Invalid" and body["details"]["causes"][0]["reason"] == "FieldValueTooLong"
    assert api.get_object("configmaps", "default", "ckpt")["data"] == {"a": "1", "b": "2"}
    huge = orjson.dumps({"metadata": {"name": "huge"}, "data": {"x": "y" * (3 * 1024 * 1024)}})
    async with http.post(
        CONFIGMAPS, data=io.BytesIO(huge), headers={"Content-Type": "application/json"}
    ) as resp:
        body = await resp.json()
    assert (resp.status, body["message"]) == (413, "Request entity too large: limit is 3145728")
    _, listed = await get_json(http, CONFIGMAPS)
    assert listed["kind"] == "ConfigMapList" and [i["metadata"]["name"] for i in listed["items"]] == ["ckpt"]


def _lease(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": name}, "spec": spec}


async def test_a_put_creates_a_missing_lease_as_leases_allow_create_on_update(
    api: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    """leaseStrategy.AllowCreateOnUpdate is true (pkg/registry/coordination/lease/strategy.go): a PUT of
    a Lease that does not exist creates it (201), whatever resourceVersion it carries; the server
    answered 404 as it does for ConfigMaps. The uid a PUT carries is a precondition: a Lease deleted
    and created again under it, or gone, is a 409 (what a replica's PUT after a GET meets then)."""
    async with http.put(f"{LEASES}/fresh", json=_lease("fresh", holderIdentity="a")) as resp:
        created = await resp.json()
        assert resp.status == 201 and created["spec"] == {"holderIdentity": "a"}
    with_rv = _lease("other", holderIdentity="b") | {"metadata": {"name": "other", "resourceVersion": "1"}}
    async with http.put(f"{LEASES}/other", json=with_rv) as resp:
        assert resp.status == 201
    async with http.put(f"{CONFIGMAPS}/missing", json={"metadata": {"name": "missing"}, "data": {}}) as resp:
        assert resp.status == 404  # ConfigMaps do not
    async with http.delete(f"{LEASES}/fresh") as resp:
        assert resp.status == 200
    uid = created["metadata"]["uid"]
    async with http.put(f"{LEASES}/fresh", json=created) as resp:  # the deleted one's uid
        body = await resp.json()
    assert (resp.status, body["reason"]) == (409, "Conflict")
    assert body["message"] == (
        'Operation cannot be fulfilled on leases.coordination.k8s.io "fresh": Precondition failed: UID in '
        f"precondition: {uid}, UID in object meta: "
    )
    current = api.get_object("leases", "default", "other")
    wrong = {**current, "metadata": {**current["metadata"], "uid": "8a4c6b5e-0000-4000-8000-000000000000"}}
    async with http.put(f"{LEASES}/other", json=wrong) as resp:
        assert resp.status == 409
    no_rv = {**current, "metadata": {"name": "other"}}
    async with http.put(f"{LEASES}/other", json=no_rv) as resp:
        body = await resp.json()
    assert (resp.status, body["details"]["kind"]) == (422, "leases")
    assert body["message"] == (  # the store names the resource here, not the kind
        'leases.coordination.k8s.io "other" is invalid: metadata.resourceVersion: Invalid value: 0x0: '
        "must be specified for an update"
    )


async def test_lease_specs_refused_as_the_decoder_and_validate_lease_spec_refuse_them(
    api: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    """The server took any spec: a regression of a lease duration the API server refuses (item 91) could
    not be caught against it. The JSON decoder refuses an int32 out of range and a MicroTime that is not
    RFC 3339 with six fraction digits (400); ValidateLeaseSpec a duration <= 0 and transitions < 0 (422)."""
    async with http.post(LEASES, json=_lease("l", holderIdentity="a", leaseDurationSeconds=15)) as resp:
        assert resp.status == 201
    refused = {
        "leaseDurationSeconds=0": (
            {"leaseDurationSeconds": 0},
            422,
            "spec.leaseDurationSeconds: Invalid value: 0: must be greater than 0",
        ),
        "leaseDurationSeconds=-5": (
            {"leaseDurationSeconds": -5},
            422,
            "Invalid value: -5: must be greater than 0",
        ),
        "leaseTransitions=-1": (
            {"leaseTransitions": -1},
            422,
            "spec.leaseTransitions: Invalid value: -1: must be greater than or equal to 0",
        ),
        "both": (
            {"leaseDurationSeconds": 0, "leaseTransitions": -1},
            422,
            '"l" is invalid: [spec.leaseDurationSeconds: Invalid value: 0: must be greater than 0, '
            "spec.leaseTransitions: Invalid value: -1: must be greater than or equal to 0]",
        ),
        "int32": (
            {"leaseDurationSeconds": 2**31},
            400,
            'Lease in version "v1" cannot be handled as a Lease: json: cannot unmarshal number 2147483648 '
            "into Go struct field LeaseSpec.spec.leaseDurationSeconds of type int32",
        ),
        "fraction": ({"leaseDurationSeconds": 1.5}, 400, "cannot unmarshal number 1.5"),
        "string": (
            {"leaseTransitions": "1"},
            400,
            "cannot unmarshal string into Go struct field LeaseSpec.spec.leaseTransitions",
        ),
        "renewTime": (
            {"renewTime": "yesterday"},
            400,
            'parsing time "yesterday" as "2006-01-02T15:04:05.000000Z07:00"',
        ),
        "no fraction": ({"renewTime": "2024-05-01T10:00:00Z"}, 400, "parsing time"),
        "month 13": ({"acquireTime": "2024-13-01T10:00:00.000000Z"}, 400, "parsing time"),
    }
    for case, (spec, status, message) in refused.items():
        current = api.get_object("leases", "default", "l")
        current["spec"].update(spec)
        async with http.put(f"{LEASES}/l", json=current) as resp:
            body = await resp.json()
        assert (resp.status, message in body["message"]) == (status, True), (case, body)
        if status == 422:
            assert (
                body["reason"] == "Invalid" and body["details"]["causes"][0]["reason"] == "FieldValueInvalid"
            )
    async with http.post(LEASES, json=_lease("m", leaseDurationSeconds=0)) as resp:
        assert resp.status == 422  # on create too
    current = api.get_object("leases", "default", "l")
    current["spec"].update(
        leaseDurationSeconds=2**31 - 1,
        leaseTransitions=0,
        renewTime="2024-05-01T10:00:00.123456+02:00",
        acquireTime="2024-05-01T08:00:00.000000Z",
    )
    async with http.put(f"{LEASES}/l", json=current) as resp:
        assert resp.status == 200


async def test_the_configmap_limit_counts_the_values_not_the_keys(
    api: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    """ValidateConfigMap adds up len(value) of data and binaryData (decoded): the keys were counted too,
    and a ConfigMap kube-apiserver takes was refused."""
    key = "a-fifteen-b-key"
    limit = 1024 * 1024
    body = {
        "metadata": {"name": "full"},
        "data": {key: "x" * (limit - 10)},
        "binaryData": {key + "2": base64.b64encode(b"y" * 10).decode()},
    }
    async with http.post(
        CONFIGMAPS, data=io.BytesIO(orjson.dumps(body)), headers={"Content-Type": "application/json"}
    ) as resp:
        assert resp.status == 201
    body["metadata"] = {"name": "over"}
    body["data"] = {key: "x" * (limit - 9)}
    async with http.post(
        CONFIGMAPS, data=io.BytesIO(orjson.dumps(body)), headers={"Content-Type": "application/json"}
    ) as resp:
        assert resp.status == 422 and "must have at most 1048576 bytes" in (await resp.json())["message"]


async def test_an_update_that_changes_nothing_keeps_the_resource_version(
    api: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    """etcd3's GuaranteedUpdate writes nothing when the object is the same: no new resourceVersion, so
    the previous one is still current (the server made it stale)."""
    async with http.post(CONFIGMAPS, json={"metadata": {"name": "same"}, "data": {"k": "v"}}) as resp:
        created = await resp.json()
    async with http.put(f"{CONFIGMAPS}/same", json=created) as resp:
        again = await resp.json()
    assert resp.status == 200 and again == created
    changed = {**created, "data": {"k": "w"}}
    async with http.put(f"{CONFIGMAPS}/same", json=changed) as resp:
        assert resp.status == 200  # the resourceVersion it carries is still current
        assert int((await resp.json())["metadata"]["resourceVersion"]) > int(
            created["metadata"]["resourceVersion"]
        )
    async with http.post(LEASES, json=_lease("same", holderIdentity="a")) as resp:
        lease = await resp.json()
    async with http.put(f"{LEASES}/same", json=lease) as resp:
        assert (await resp.json())["metadata"]["resourceVersion"] == lease["metadata"]["resourceVersion"]


async def test_held_answers_come_after_the_write_took_effect(
    api: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    async with http.post(CONFIGMAPS, json={"metadata": {"name": "slow"}, "data": {"k": "v"}}) as resp:
        created = await resp.json()
    answers = api.hold_answers("PUT", "configmaps")
    put = asyncio.create_task(http.put(f"{CONFIGMAPS}/slow", json={**created, "data": {"k": "w"}}))
    await api.wait_until(lambda: api.held == 1)
    assert api.get_object("configmaps", "default", "slow")["data"] == {"k": "w"} and not put.done()
    answers.set()
    async with await put as resp:
        assert resp.status == 200 and (await resp.json())["data"] == {"k": "w"}


# --- kubernetes-asyncio ----------------------------------------------------------------------------


async def test_kubernetes_asyncio_lists_pages_and_watches(api: FakeApiServer, tmp_path: Path) -> None:
    await api.load_recording(recorded_watch())
    configuration = kclient.Configuration()
    await kconfig.load_kube_config(
        config_file=api.kubeconfig(tmp_path / "kubeconfig"), client_configuration=configuration
    )
    async with kclient.ApiClient(configuration) as api_client:
        v1 = kclient.CoreV1Api(api_client)
        page = await v1.list_event_for_all_namespaces(limit=50)
        assert len(page.items) == 50 and page.metadata.remaining_item_count == 42
        rest = await v1.list_event_for_all_namespaces(limit=50, _continue=page.metadata._continue)
        assert len(rest.items) == 42 and rest.metadata.resource_version == page.metadata.resource_version
        name = page.items[0].metadata.name
        api.bump("default", name)
        seen = []
        async with kwatch.Watch() as w:
            async for event in w.stream(
                v1.list_event_for_all_namespaces,
                resource_version=page.metadata.resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=5,
            ):
                seen.append((event["type"], event["object"].metadata.name))
                if event["type"] == "MODIFIED":
                    assert isinstance(event["object"], kclient.CoreV1Event)
                    assert event["object"].series.count == 2
                    break
        assert seen == [("MODIFIED", name)]
        lease = kclient.V1Lease(
            metadata=kclient.V1ObjectMeta(name="lock"), spec=kclient.V1LeaseSpec(holder_identity="me")
        )
        created = await kclient.CoordinationV1Api(api_client).create_namespaced_lease("default", lease)
        assert created.metadata.resource_version == str(api.resource_version)
        with pytest.raises(ApiException) as info:
            await kclient.CoordinationV1Api(api_client).create_namespaced_lease("default", lease)
        assert info.value.status == 409
    bad = kclient.Configuration()
    await kconfig.load_kube_config(
        config_file=api.kubeconfig(tmp_path / "bad", token="wrong"), client_configuration=bad
    )
    async with kclient.ApiClient(bad) as api_client:
        with pytest.raises(ApiException) as info:
            await kclient.CoreV1Api(api_client).list_event_for_all_namespaces()
        assert info.value.status == 401


async def test_kubernetes_asyncio_watch_raises_on_in_stream_410(api: FakeApiServer, tmp_path: Path) -> None:
    api.create_event(event_object(name="a"))
    old = api.resource_version
    api.bump("default", "a")
    api.compact()
    configuration = kclient.Configuration()
    await kconfig.load_kube_config(
        config_file=api.kubeconfig(tmp_path / "kc"), client_configuration=configuration
    )
    async with kclient.ApiClient(configuration) as api_client, kwatch.Watch() as w:
        v1 = kclient.CoreV1Api(api_client)
        with pytest.raises(ApiException) as info:
            async for _ in w.stream(
                v1.list_event_for_all_namespaces, resource_version=str(old), timeout_seconds=5
            ):
                pass
    assert info.value.status == 410


# --- throughput --------------------------------------------------------------------------------------


async def test_a_watcher_keeps_up_with_thousands_of_writes_per_second(
    api: FakeApiServer, http: aiohttp.ClientSession
) -> None:
    total = 20_000
    received = 0
    async with http.get(EVENTS, params={"watch": "1", "resourceVersion": str(api.resource_version)}) as resp:
        await api.wait_until(lambda: api.active_watches == 1)
        started = time.monotonic()

        async def write() -> None:
            for i in range(total):
                api.create_event(event_object(name=f"e{i}"))
                if i % 500 == 499:
                    await asyncio.sleep(0)

        writer = asyncio.create_task(write())
        async for _line in resp.content:
            received += 1
            if received == total:
                break
        await writer
        elapsed = time.monotonic() - started
    assert received == total
    assert total / elapsed > 5_000, f"{total / elapsed:.0f} events/s"


@pytest.fixture
async def etcd() -> AsyncIterator[FakeApiServer]:
    """Events straight from etcd, as kube-apiserver 1.24 serves them by default."""
    async with FakeApiServer(
        token=TOKEN, watch_cache=False, bookmark_interval=0.05, history_size=3
    ) as server:
        yield server


@pytest.fixture
async def etcd_http(etcd: FakeApiServer) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(etcd.url, headers={"Authorization": f"Bearer {TOKEN}"}) as session:
        yield session


async def test_without_the_watch_cache_a_watch_sends_no_bookmarks(
    etcd: FakeApiServer, etcd_http: aiohttp.ClientSession
) -> None:
    rv = str(etcd.resource_version)
    quiet = await read_watch(
        etcd_http, EVENTS, resourceVersion=rv, allowWatchBookmarks="true", timeoutSeconds="1"
    )
    assert quiet == []  # a second of nothing: the cacher would have sent ~20 bookmarks at this interval
    etcd.create_event(event_object(name="ev-0"))
    lines = await read_watch(
        etcd_http, EVENTS, resourceVersion=rv, allowWatchBookmarks="true", timeoutSeconds="1"
    )
    assert [line["type"] for line in lines] == ["ADDED"]


async def test_without_the_watch_cache_history_is_kept_until_compaction_and_lists_at_0_are_paged(
    etcd: FakeApiServer, etcd_http: aiohttp.ClientSession
) -> None:
    start = str(etcd.resource_version)
    for i in range(6):
        etcd.create_event(event_object(name=f"ev-{i}"))
    # etcd replays every change after the resourceVersion, however many (the cache kept 3 here).
    lines = await read_watch(etcd_http, EVENTS, 6, resourceVersion=start, timeoutSeconds="5")
    assert [line["object"]["metadata"]["name"] for line in lines] == [f"ev-{i}" for i in range(6)]
    # resourceVersion=0 goes to etcd too: limit and continue are honoured.
    _, page = await get_json(etcd_http, EVENTS, resourceVersion="0", limit="2")
    assert [i["metadata"]["name"] for i in page["items"]] == ["ev-0", "ev-1"]
    assert page["metadata"]["remainingItemCount"] == 4 and page["metadata"]["continue"]


async def test_the_compactor_compacts_to_the_previous_ticks_revision_and_an_older_watch_gets_etcds_410() -> (
    None
):
    async with (
        FakeApiServer(token=TOKEN, watch_cache=False, compaction_interval=0.2) as etcd,
        aiohttp.ClientSession(etcd.url, headers={"Authorization": f"Bearer {TOKEN}"}) as http,
    ):
        before = etcd.resource_version
        etcd.create_event(event_object(name="ev-0"))
        after = etcd.resource_version
        # The first tick compacts to the revision seen when the compactor started, the second past ev-0.
        await etcd.wait_until(lambda: etcd.oldest_resource_version > before, timeout=5)
        assert etcd.oldest_resource_version == after
        [line] = await read_watch(http, EVENTS, resourceVersion=str(before))
        assert line["type"] == "ERROR"
        assert (line["object"]["code"], line["object"]["reason"], line["object"]["message"]) == (
            410,
            "Expired",
            "The resourceVersion for the provided watch is too old.",
        )
        etcd.create_event(event_object(name="ev-1"))
        lines = await read_watch(http, EVENTS, 1, resourceVersion=str(after), timeoutSeconds="5")
        assert [line["object"]["metadata"]["name"] for line in lines] == ["ev-1"]
