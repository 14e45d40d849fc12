"""The depth ``_one_value`` reports for an item of a list page (session 36; item 307's Left).

Item 307's regex passes made each short innermost container a value, and counted each pass as a level.
A pass also takes the short containers of shallow branches. So when the deepest branch's innermost
was too long for a pass, ``[[0],[[[0…]]]]`` read 5 for 4, up to 16 levels over. An item with broken
Unicode that the fallback refuses for its text, just under ``REPAIR_DEPTH``, was then refused alone
("too deep to repair") instead of failing its page as any page that is not JSON."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from source_helpers import count as _count
from source_helpers import memory_router as _router
from source_helpers import memory_sink as _mem

from eventrouter.source import list_page
from eventrouter.testing import event_object
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.waiting import until


def _chain(height: int, inner: bytes = b"0") -> bytes:
    """Arrays nested ``height`` levels around ``inner``."""
    return b"[" * height + inner + b"]" * height


_LONG = b"[" + b",".join([b"0"] * (list_page._SHORT + 2)) + b"]"
"""An array too long for a pass: it is left to orjson between its brackets."""


def _beside_short_chains(depth: int, chains: int = 100, height: int = 16) -> bytes:
    """An array ``depth`` levels deep: ``chains`` chains ``height`` high (each pass takes one level of
    each, enough to be worth another pass), then a branch whose innermost is ``_LONG``."""
    return b"[" + b",".join([_chain(height)] * chains + [_chain(depth - 2, _LONG)]) + b"]"


# ---- the depth read ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "depth"),
    [
        # The review's case: the pass took [0] (the shallow branch), not the long innermost.
        pytest.param(b"[[0]," + _chain(2, _LONG) + b"]", 4, id="review_case"),
        # 16 passes, each taking a level of the short chains only: 16 over.
        pytest.param(_beside_short_chains(40), 40, id="16_passes_over_a_deep_branch"),
        pytest.param(_beside_short_chains(899), 899, id="just_under_the_repair_depth"),
    ],
)
def test_an_item_beside_short_containers_reads_its_exact_depth(text: bytes, depth: int) -> None:
    """Read 5 for 4, 56 for 40, 915 for 899 (a pass a level, on top of the brackets left); exact now."""
    assert list_page._one_value(text) == depth


# ---- the page: broken Unicode just under the repair depth -------------------------------------------


def _broken_item(depth: int) -> bytes:
    """An item nested ``depth`` levels, with an invalid UTF-8 byte (orjson refuses it) and NaN (so the
    Unicode fallback refuses it too, for its text: it takes ~990 levels)."""
    return (
        b'{"metadata":{"uid":"deep","name":"d","namespace":"a"},"m":"bad\xffbyte","n":NaN,"x":'
        + _beside_short_chains(depth - 1)
        + b"}"
    )


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer() as server:
        server.bookmark_interval = 0.2
        yield server


async def test_an_item_with_broken_unicode_just_under_the_repair_depth_fails_its_page_whole(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """899 levels, read 915: refused alone ("nested 915 levels, too deep to repair"), ``malformed`` 1,
    the page taken. A fallback that refuses an item so shallow refuses its text (NaN), not its depth:
    the page fails whole, as any page that is not JSON, and the next list delivers all 20. At 900
    levels the item is still refused alone, its depth told exactly."""
    for i in range(20):
        api.create_event(event_object(namespace="a", name=f"e{i:03d}", object_name=f"o{i:02d}"))
    api.faults.malformed_next_list(_broken_item(899))
    router = _router(api, tmp_path)
    caplog.set_level(logging.WARNING)
    async with router.running():
        await until(lambda: router.watchers[0].initial_list_done.is_set())
        await until(lambda: len(_mem(router).received) == 20)
        assert {o.record["involved_object"]["name"] for o in _mem(router).received} == {
            f"o{i:02d}" for i in range(20)
        }
        assert _count(router, "source_dropped", "malformed") == 0
        assert _count(router, "watch_restarts", "http_500") == 1
    assert not [r for r in caplog.records if "skipped a list item" in r.getMessage()]

    page = b'{"kind":"EventList","metadata":{"resourceVersion":"1"},"items":[' + _broken_item(900) + b"]}"
    with pytest.raises(orjson.JSONDecodeError):
        list_page.loads_page(page.replace(_broken_item(900), _broken_item(899)))
    refused = list_page.loads_page(page).refused
    assert [r.why.rsplit("; ", 1)[-1] for r in refused] == ["nested 900 levels, too deep to repair"]


# ---- the fuzz: the depth read against a bracket counter ---------------------------------------------


def _counted(text: bytes) -> int:
    """How deep ``text``'s brackets nest, its strings left out: the exact depth of a JSON text."""
    depth = deepest = 0
    in_string = escaped = False
    for c in text:
        if in_string:
            if escaped:
                escaped = False
            elif c == 0x5C:
                escaped = True
            elif c == 0x22:
                in_string = False
        elif c == 0x22:
            in_string = True
        elif c in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in b"]}":
            depth -= 1
    return deepest


_SCALARS = [
    b"0",
    b"-1.5e3",
    b"true",
    b"false",
    b"null",
    b'""',
    b'"a]\\"}["',
    b'"\\u00e9,:"',
    b"NaN",
    b"1e400",
]
_SPACES = [b"", b"", b"", b" ", b"\n\t "]


class _Texts:
    """Random JSON texts that strain the passes: short chains beside branches whose innermost is long
    (no pass takes it), many small containers (passes worth going on), texts between two brackets
    past a 64 KiB piece."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def ws(self) -> bytes:
        return self.rng.choice(_SPACES)

    def container(self, items: list[bytes]) -> bytes:
        sep = self.ws() + b"," + self.ws()
        if self.rng.random() < 0.3:
            members = [b'"k%d"' % i + self.ws() + b":" + self.ws() + v for i, v in enumerate(items)]
            return b"{" + self.ws() + sep.join(members) + self.ws() + b"}"
        return b"[" + self.ws() + sep.join(items) + self.ws() + b"]"

    def value(self, budget: int) -> bytes:
        rng = self.rng
        if budget <= 0 or rng.random() < 0.2:
            return rng.choice(_SCALARS)
        kind = rng.random()
        if kind < 0.25:  # a chain of one-item containers, 1 to 20 high
            inner = self.value(budget - 1) if rng.random() < 0.3 else rng.choice(_SCALARS)
            for _ in range(rng.randint(1, 20)):
                inner = self.container([inner])
            return inner
        if kind < 0.4:  # a long innermost: more items than a pass takes
            return self.container([rng.choice(_SCALARS) for _ in range(rng.randint(60, 80))])
        if rng.random() < 0.8:
            return self.container([self.value(budget - 1) for _ in range(rng.randint(0, 4))])
        small = [self.container([rng.choice(_SCALARS)]) for _ in range(rng.randint(20, 100))]
        return self.container(small)  # many small containers: a pass worth going on

    def deep_beside_short(self) -> bytes:
        """The review's shape: short chains of many heights beside a deep branch with a long innermost."""
        rng = self.rng
        deep = self.container([rng.choice(_SCALARS) for _ in range(rng.randint(60, 90))])
        for _ in range(rng.randint(1, 30)):
            deep = self.container([deep] + [rng.choice(_SCALARS) for _ in range(rng.randint(0, 2))])
        chains = [_chain(rng.randint(0, 20)) for _ in range(rng.randint(1, 60))]
        items = [*chains, deep]
        rng.shuffle(items)
        return self.container(items)

    def long_between(self) -> bytes:
        """An array of chains up to 1-4 high (the passes make each a value of its height) and
        scalars: a text between two brackets past 64 KiB (checked a piece at a time), values of every
        height near any cut; and maybe the review's shape, its brackets within that text."""
        rng = self.rng
        highest = rng.randint(1, 4)
        items = [
            _chain(rng.randint(1, highest), rng.choice(_SCALARS))
            if rng.random() < 0.7
            else rng.choice(_SCALARS)
            for _ in range(rng.randint(18_000, 30_000))
        ]
        if rng.random() < 0.5:
            items.insert(rng.randrange(len(items)), self.deep_beside_short())
        return _chain(rng.randint(0, 3), b"[" + b",".join(items) + b"]")


def _mutated(rng: random.Random, text: bytes) -> bytes:
    at = rng.randrange(len(text) + 1)
    byte = bytes([rng.choice(b'[]{},:"\\0 -en\x81\x90\xff')])  # and the bytes a pass writes
    op = rng.randrange(3)
    if op == 0:
        return text[:at] + text[at + 1 :]
    if op == 1:
        return text[:at] + byte + text[at:]
    return text[:at] + byte + text[at + 1 :]


def _one(text: bytes) -> int | None:
    try:
        # NaN, Infinity as the grammar check takes them; a string's bytes are not checked as UTF-8.
        json.loads(text.decode("latin-1"))
    except ValueError:
        return None
    return _counted(text)


def test_one_values_depth_is_a_bracket_counters_on_random_and_adversarial_texts() -> None:
    """Seeded, 400 texts (and a byte of each mutated): ``_one_value`` says one value exactly when
    json.loads does, and reads the depth a bracket counter reads. It read up to 16 levels over."""
    # A value a pass made that is higher than the brackets around the deepest branch; in an object.
    assert list_page._one_value(b"[" + _chain(15) + b"," + _chain(3, _LONG) + b"]") == 16
    assert list_page._one_value(b'{"a":' + _chain(5) + b',"b":[' + _chain(1, _LONG) + b"]}") == 6
    # The bytes a pass writes for a value are no JSON outside a string, in a string any byte is.
    for text in (b"[\x81]", b"\x85", b'{"":\x90}'):
        assert list_page._one_value(text) is None
    assert list_page._one_value(b'["\x81"]') == 1
    texts = _Texts(36)
    rng = random.Random(3607)
    for n in range(400):
        if n % 100 == 0:
            text = texts.long_between()
        elif n % 2:
            text = texts.deep_beside_short()
        else:
            text = texts.value(8)
        depth = _counted(text)
        assert depth < 200  # json.loads recurses out at ~990
        read = list_page._one_value(text)
        assert read == depth, (n, read, depth, text[:200])
        broken = _mutated(rng, text)
        assert list_page._one_value(broken) == _one(broken), (n, broken[:200])
