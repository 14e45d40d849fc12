"""Field and label selectors, and the three PATCH formats, as kube-apiserver applies them."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping
from typing import Any

from eventrouter.testing.apiserver_status import ApiError, bad_request

__all__ = [
    "EVENT_FIELDS",
    "FieldSelector",
    "LabelSelector",
    "apply_patch",
    "event_fields",
    "meta_fields",
]

# The fields pkg/registry/core/event/strategy.go (ToSelectableFields) indexes for core/v1 Events.
EVENT_FIELDS = frozenset(
    {
        "metadata.name",
        "metadata.namespace",
        "involvedObject.kind",
        "involvedObject.namespace",
        "involvedObject.name",
        "involvedObject.uid",
        "involvedObject.apiVersion",
        "involvedObject.resourceVersion",
        "involvedObject.fieldPath",
        "reason",
        "reportingComponent",
        "source",
        "type",
    }
)
META_FIELDS = frozenset({"metadata.name", "metadata.namespace"})


def _s(value: Any) -> str:
    return value if isinstance(value, str) else "" if value is None else str(value)


def event_fields(obj: Mapping[str, Any]) -> dict[str, str]:
    meta = obj.get("metadata") or {}
    io = obj.get("involvedObject") or {}
    # "source" falls back to the events.k8s.io reporting controller, as the real field index does.
    source = _s((obj.get("source") or {}).get("component")) or _s(obj.get("reportingComponent"))
    return {
        "metadata.name": _s(meta.get("name")),
        "metadata.namespace": _s(meta.get("namespace")),
        "involvedObject.kind": _s(io.get("kind")),
        "involvedObject.namespace": _s(io.get("namespace")),
        "involvedObject.name": _s(io.get("name")),
        "involvedObject.uid": _s(io.get("uid")),
        "involvedObject.apiVersion": _s(io.get("apiVersion")),
        "involvedObject.resourceVersion": _s(io.get("resourceVersion")),
        "involvedObject.fieldPath": _s(io.get("fieldPath")),
        "reason": _s(obj.get("reason")),
        "reportingComponent": _s(obj.get("reportingComponent")),
        "source": source,
        "type": _s(obj.get("type")),
    }


def meta_fields(obj: Mapping[str, Any]) -> dict[str, str]:
    meta = obj.get("metadata") or {}
    return {"metadata.name": _s(meta.get("name")), "metadata.namespace": _s(meta.get("namespace"))}


def _split_unescaped(text: str, sep: str) -> list[str]:
    parts, cur, i = [], [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            cur.append(text[i : i + 2])
            i += 2
            continue
        if ch == sep:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return parts


def _unescape(text: str) -> str:
    r"""fields.UnescapeValue: only ``\\``, ``\,`` and ``\=`` are escapes; an unescaped ``=`` or ``,``
    in a value is an error."""
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            seq = text[i : i + 2]
            if len(seq) < 2 or seq[1] not in "\\,=":
                raise bad_request(f"invalid field selector: invalid escape sequence: {seq}")
            out.append(seq[1])
            i += 2
            continue
        if ch in "=,":
            raise bad_request(f"invalid field selector: unescaped character in value: {ord(ch)}")
        out.append(ch)
        i += 1
    return "".join(out)


class FieldSelector:
    """``a=b,c!=d`` (``=``, ``==``, ``!=``; comma is AND) over a fixed set of indexed fields."""

    def __init__(self, text: str, supported: frozenset[str]) -> None:
        self.text = text
        self.terms: list[tuple[str, bool, str]] = []  # (field, equal?, value)
        # As fields.ParseSelector: terms split at unescaped commas, empty ones skipped, nothing
        # trimmed (" reason" is a field label of its own, and not a supported one).
        for term in _split_unescaped(text, ","):
            if not term:
                continue
            m = re.match(r"^((?:[^\\=!]|\\.)*?)(!=|==|=)(.*)$", term)
            if not m:
                raise bad_request(f"invalid selector: '{text}'; can't understand '{term}'")
            field, op, value = m.group(1), m.group(2), _unescape(m.group(3))
            if field not in supported:
                raise bad_request(f"field label not supported: {field}")
            self.terms.append((field, op != "!=", value))

    @property
    def empty(self) -> bool:
        return not self.terms

    def matches(self, fields: Mapping[str, str]) -> bool:
        return all((fields.get(f, "") == v) is eq for f, eq, v in self.terms)


_LABEL_TERM = re.compile(
    r"^\s*(?:(?P<neg>!)\s*(?P<nkey>[^\s=!(),]+)"
    r"|(?P<skey>[^\s=!(),]+)\s*(?P<setop>in|notin)\s*\((?P<vals>[^)]*)\)"
    r"|(?P<key>[^\s=!(),]+)\s*(?:(?P<op>!=|==|=)\s*(?P<val>[^\s,()]*))?)\s*$"
)


class LabelSelector:
    """Label selector: ``k=v``, ``k==v``, ``k!=v``, ``k``, ``!k``, ``k in (a,b)``, ``k notin (a,b)``."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.terms: list[Callable[[Mapping[str, str]], bool]] = []
        if not text.strip():
            return
        depth, cur, parts = 0, list[str](), list[str]()
        for ch in text:
            depth += ch == "("
            depth -= ch == ")"
            if ch == "," and depth == 0:
                parts.append("".join(cur))
                cur = []
            else:
                cur.append(ch)
        parts.append("".join(cur))
        for part in parts:
            m = _LABEL_TERM.match(part)
            if not m:
                raise bad_request(
                    f"unable to parse requirement: found '{part.strip()}', expected: identifier"
                )
            self.terms.append(self._term(m))

    @staticmethod
    def _term(m: re.Match[str]) -> Callable[[Mapping[str, str]], bool]:
        if m.group("neg"):
            nkey = m.group("nkey")
            return lambda labels: nkey not in labels
        if m.group("setop"):
            skey = m.group("skey")
            values = {v.strip() for v in m.group("vals").split(",")}
            if m.group("setop") == "in":
                return lambda labels: labels.get(skey) in values
            return lambda labels: labels.get(skey) not in values
        key, op, val = m.group("key"), m.group("op"), m.group("val")
        if op is None:
            return lambda labels: key in labels
        if op == "!=":
            return lambda labels: labels.get(key) != val
        return lambda labels: labels.get(key) == val

    @property
    def empty(self) -> bool:
        return not self.terms

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(term(labels) for term in self.terms)


# --- PATCH -----------------------------------------------------------------------------------------

MERGE = "application/merge-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386. Strategic merge patch is applied the same way: Events, ConfigMaps and Leases have no
    lists with merge keys that a client would patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ApiError(422, f"invalid JSON pointer: {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc: Any, parts: list[str], path: str) -> Any:
    for part in parts:
        if isinstance(doc, dict) and part in doc:
            doc = doc[part]
        elif isinstance(doc, list) and part.isdigit() and int(part) < len(doc):
            doc = doc[int(part)]
        else:
            raise ApiError(422, f"doc is missing path: {path!r}")
    return doc


def _json_patch(doc: Any, ops: Any) -> Any:
    if not isinstance(ops, list):
        raise bad_request("json: cannot unmarshal object into Go value of type jsonpatch.Patch")
    doc = copy.deepcopy(doc)
    for op in ops:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise ApiError(422, f"invalid JSON patch operation: {op!r}")
        kind, path = op["op"], op["path"]
        parts = _pointer(path)

        def put(value: Any, parts: list[str] = parts, path: str = path, replace: bool = False) -> None:
            nonlocal doc
            if not parts:
                doc = value
                return
            parent = _walk(doc, parts[:-1], path)
            last = parts[-1]
            if isinstance(parent, dict):
                if replace and last not in parent:
                    raise ApiError(422, f"replace operation does not apply: doc is missing key: {path}")
                parent[last] = value
            elif isinstance(parent, list):
                if last == "-":
                    parent.append(value)
                elif last.isdigit() and int(last) <= len(parent):
                    if replace:
                        parent[int(last)] = value
                    else:
                        parent.insert(int(last), value)
                else:
                    raise ApiError(422, f"doc is missing path: {path!r}")
            else:
                raise ApiError(422, f"doc is missing path: {path!r}")

        def take(parts: list[str] = parts, path: str = path) -> Any:
            parent = _walk(doc, parts[:-1], path)
            last = parts[-1] if parts else ""
            if isinstance(parent, dict) and last in parent:
                return parent.pop(last)
            if isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
                return parent.pop(int(last))
            raise ApiError(422, f"remove operation does not apply: doc is missing path: {path!r}")

        if kind == "add":
            put(copy.deepcopy(op.get("value")))
        elif kind == "replace":
            put(copy.deepcopy(op.get("value")), replace=True)
        elif kind == "remove":
            take()
        elif kind in ("move", "copy"):
            src = _pointer(op.get("from", ""))
            value = take(src, op.get("from", "")) if kind == "move" else copy.deepcopy(_walk(doc, src, path))
            put(value)
        elif kind == "test":
            if _walk(doc, parts, path) != op.get("value"):
                raise ApiError(422, f"testing value {path} failed: test failed")
        else:
            raise ApiError(422, f"Unexpected kind: {kind}")
    return doc


def apply_patch(content_type: str, target: dict[str, Any], patch: Any) -> dict[str, Any]:
    media = content_type.split(";")[0].strip().lower()
    if media in (MERGE, STRATEGIC):
        result = merge_patch(target, patch)
    elif media == JSON_PATCH:
        result = _json_patch(target, patch)
    else:
        raise ApiError(
            415,
            f"the body of the request was in an unknown format - accepted media types include: "
            f"{JSON_PATCH}, {MERGE}, {STRATEGIC}",
        )
    if not isinstance(result, dict):
        raise ApiError(422, "the patched object is not a JSON object")
    return result
