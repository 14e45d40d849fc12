"""Generate the parts of docs/ that must not drift from the code.

* ``docs/sinks.md`` — every built-in sink's options, from its pydantic ``options_model``, plus the
  common filter and pipeline options and each sink's ``default_filter``.
* the example in ``docs/record.md`` (between the ``GENERATED`` markers) — the normalised record of a
  real recorded event, produced by ``eventrouter.record.normalise``.
* ``config`` in the Helm chart's ``values.schema.json`` — the keys ``RouterConfig`` takes, and for each
  built-in sink type the keys its entry may hold (its options, the filter and pipeline options) with
  their values' enum and bounds, so that a typo or a value out of range fails ``helm install``/``helm
  upgrade`` instead of the new pod (exit 2).
* the chart's ``files/sink-options.json`` — the option keys of each built-in sink type, which the
  chart's template checks the query of each ``--sink`` flag against (and a number's text, also in
  ``config.sinks``), ``files/one-value-options.json`` — the keys of each built-in type's options
  of one value, which a flag may not give twice, and ``files/url-query-passthrough.json`` — the
  built-in types whose unknown query keys stay in their URL (the webhook's).

``python scripts/gen_docs.py`` rewrites them; ``python scripts/gen_docs.py --check`` exits 1 when they
are stale (tests/test_docs.py runs it).
"""

from __future__ import annotations

import argparse
import difflib
import enum
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

import orjson
from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    PlainValidator,
    SecretStr,
    TypeAdapter,
    ValidationError,
    WrapValidator,
)
from pydantic.fields import FieldInfo

from eventrouter.config import RouterConfig
from eventrouter.options import FilterOptions, PipelineOptions, field_keys, field_names
from eventrouter.plugins import PluginError, discover
from eventrouter.record import normalise, occurrence_number
from eventrouter.testing import recorded_watch

DOCS = Path(__file__).resolve().parent.parent / "docs"
CHART_SCHEMA = Path("charts") / "eventrouter" / "values.schema.json"  # beside docs/
SINK_OPTIONS = Path("files") / "sink-options.json"  # in the chart, beside its values.schema.json
ONE_VALUE_OPTIONS = Path("files") / "one-value-options.json"
URL_QUERY_PASSTHROUGH = Path("files") / "url-query-passthrough.json"
REGEN = "python scripts/gen_docs.py"
# Only the sinks this repository ships: a third-party plugin installed in the developer's environment
# must not change the committed docs.
BUILTIN_DISTRIBUTION = "eventrouter"

RECORD_BEGIN = "<!-- BEGIN GENERATED: record-example (scripts/gen_docs.py) -->"
RECORD_END = "<!-- END GENERATED: record-example -->"
EXAMPLE_REASON = "FailedMount"
EXAMPLE_CLUSTER = "prod"


# ---- rendering option models ----------------------------------------------------------------------


def _is_secret(annotation: Any) -> bool:
    if annotation is SecretStr:
        return True
    return any(_is_secret(arg) for arg in typing.get_args(annotation))


def type_name(annotation: Any) -> str:
    """A short, stable name for a field type: ``Secret``, ``list[str]``, ``one of `a`, `b```."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is SecretStr:
        return "Secret"
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is typing.Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        # `X | None`: None is the "unset" default, shown in the default column.
        names = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(names)
    if origin in (list, tuple, set, frozenset):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    if origin is dict:
        return f"dict[{', '.join(type_name(a) for a in args)}]"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, float):
        return format(value, "g")
    return str(value)


def default_text(info: FieldInfo) -> str:
    if info.is_required():
        return "**required**"
    if _is_secret(info.annotation):
        return "—"  # never print a credential, not even a default one
    value = info.get_default(call_default_factory=True)
    if value is None:
        return "—"
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    if isinstance(value, (list, tuple, set)):
        return f"`{','.join(_scalar(v) for v in value)}`" if value else "`[]`"
    if isinstance(value, dict):
        return f"`{','.join(f'{k}={_scalar(v)}' for k, v in value.items())}`" if value else "`{}`"
    return f"`{_scalar(value)}`"


def aliases(name: str, info: FieldInfo) -> list[str]:
    alias = info.validation_alias
    found: list[str] = []
    if isinstance(alias, str):
        found.append(alias)
    elif isinstance(alias, AliasChoices):
        found.extend(choice for choice in alias.choices if isinstance(choice, str))
    if info.alias:
        found.append(info.alias)
    return [a for a in dict.fromkeys(found) if a != name]


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def options_table(model: type[BaseModel]) -> list[str]:
    lines = [
        "| Option | Also accepted | Type | Default | Description |",
        "|---|---|---|---|---|",
    ]
    for name, info in model.model_fields.items():
        also = ", ".join(f"`{a}`" for a in aliases(name, info))
        lines.append(
            f"| `{name}` | {also} | {_cell(type_name(info.annotation))} | {_cell(default_text(info))} "
            f"| {_cell(info.description or '')} |"
        )
    return lines


# ---- docs/sinks.md --------------------------------------------------------------------------------

_SINKS_INTRO = f"""\
<!-- GENERATED by scripts/gen_docs.py from the sinks' option models. Do not edit: run `{REGEN}`. -->
# Sink options

Every sink is configured by one flat set of keys, the same on the command line and in YAML:

```
--sink=TYPE:URL?key=value&key2=a,b
```

```yaml
sinks:
  - type: TYPE
    url: URL
    key: value
    key2: [a, b]
```

The part after `TYPE:` and before `?` becomes the option `url`; every query key is an option. List
options accept `a,b` or a repeated key. `Secret` options accept a literal, `env:NAME` (an environment
variable) or `file:/path` (a mounted Secret file) and are never printed; their defaults are not shown
here. An unknown key is an error that names the sink and the key. When a `file:` secret or a file
option (`ca_file`, `cert_file`, `key_file`, `body_template_file`) changes on disk, the sink is rebuilt
with it between two batches, without a restart (`--reload-interval`, 5 s; a SIGHUP checks at once).

Besides its own options below, every sink accepts the [filter options](#filter-options-every-sink) and
the [pipeline options](#pipeline-options-every-sink); a sink's own options may not reuse those names.
This page lists the sinks shipped with eventrouter; `eventrouter sinks` also lists installed
third-party sinks.
"""

_FILTER_NOTES = """\
Empty lists mean "no restriction", and so does an empty `message` or `exclude_message`. All given
conditions must hold. `namespaces`, `kinds`, `reasons`, `components` and their `exclude_` forms match
names ignoring case (`kinds=pod` is `Pod`), or shell-style globs (`kube-*`) when a value contains `*`,
`?` or `[`. `components` matches the record's `reporting_component` or `source_component`. `message`
and `exclude_message` are regular expressions searched anywhere in the message. `level=Warning` keeps Warning events only; `level=Normal` keeps all. `min_count` compares
the occurrence number.
"""

_PIPELINE_NOTES = """\
The engine runs one pipeline per sink: filter → bounded memory queue → batches → `send` with
retries (exponential backoff with jitter, at least the destination's Retry-After) → checkpoint.
A full memory queue drops its oldest occurrence (counted as `queue_full`) unless `--data-dir` is set
(and `spool_max_bytes` is not 0), in which case occurrences spill to the disk spool; a full spool drops
its oldest (`spool_full`).
Rejected items and items out of retry attempts go to `<data-dir>/deadletter/<sink>.jsonl`.
"""


def render_sinks() -> str:
    out = [_SINKS_INTRO]
    plugins = {n: p for n, p in discover().items() if p.distribution == BUILTIN_DISTRIBUTION}
    out.append("Sinks: " + " · ".join(f"[{name}](#{name})" for name in sorted(plugins)) + "\n")
    documented: dict[str, str] = {}  # entry-point value → first sink name documenting it
    for name in sorted(plugins):
        plugin = plugins[name]
        out.append(f"## {name}\n")
        out.append(f'Entry point: `{name} = "{plugin.value}"`\n')
        try:
            cls = plugin.load()
        except PluginError as exc:
            out.append(f"**This sink failed to load**, so its options are not listed: {_cell(str(exc))}\n")
            continue
        description = cls.description or (cls.__doc__ or "").strip().split("\n")[0]
        if description:
            out.append(_cell(description) + "\n")
        default_filter: dict[str, Any] = dict(getattr(cls, "default_filter", {}) or {})
        if default_filter:
            given = ", ".join(f"`{k}={_scalar(v)}`" for k, v in default_filter.items())
            how = (
                "Any of `level`, `types` given (not empty) replaces a default on the event type "
                "(`level=Normal` receives every event); other keys override the default of the same key."
            )
            out.append(f"Default filter: {given}. {how}\n")
        if getattr(cls, "url_query_passthrough", False):
            out.append(
                "Query keys in `--sink=...?` that are neither options of this sink nor filter or pipeline "
                "options stay in the URL (for endpoints that take their own query parameters).\n"
            )
        first = documented.get(plugin.value)
        if first is not None:
            out.append(f"Same sink class as [{first}](#{first}); the options are identical.\n")
            continue
        documented[plugin.value] = name
        out.append("\n".join(options_table(cls.options_model)) + "\n")
    out.append("## Filter options (every sink)\n")
    out.append(_FILTER_NOTES)
    out.append("\n".join(options_table(FilterOptions)) + "\n")
    out.append("## Pipeline options (every sink)\n")
    out.append(_PIPELINE_NOTES)
    out.append("\n".join(options_table(PipelineOptions)) + "\n")
    return "\n".join(out)


# ---- the example in docs/record.md ----------------------------------------------------------------


def _json(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()


def render_record_example() -> str:
    """The FailedMount series event from the recording: its watch events, the raw object, the record."""
    stream = [w for w in recorded_watch() if w["object"].get("reason") == EXAMPLE_REASON]
    if not stream:
        raise SystemExit(f"gen_docs: no {EXAMPLE_REASON} event in the recorded watch stream")
    uid = stream[0]["object"]["metadata"]["uid"]
    stream = [w for w in stream if w["object"]["metadata"]["uid"] == uid]
    rows = [
        "| watch event | `series.count` | `series.lastObservedTime` | occurrence key | record `time` |",
        "|---|---|---|---|---|",
    ]
    for w in stream:
        obj = w["object"]
        series = obj.get("series") or {}
        occ = normalise(obj, cluster=EXAMPLE_CLUSTER)
        rows.append(
            f"| {w['type']} | {series.get('count', '—')} | {series.get('lastObservedTime', '—')} "
            f"| `{obj['metadata']['uid']}/{occurrence_number(obj)}` | `{occ.record['time']}` |"
        )
    last = stream[-1]["object"]
    shown = {**last, "metadata": {k: v for k, v in last["metadata"].items() if k != "managedFields"}}
    record = normalise(last, cluster=EXAMPLE_CLUSTER).record
    return "\n".join(
        [
            RECORD_BEGIN,
            f"The `{EXAMPLE_REASON}` event below was recorded from a Kubernetes 1.24 API server "
            "(`eventrouter.testing.recorded_watch()`). It was written through events.k8s.io, so "
            "`count`, `firstTimestamp` and `lastTimestamp` are null and repeats raise `series.count`. "
            "Each watch event that raises the number is one occurrence:",
            "",
            *rows,
            "",
            "The last object as the API server sent it (`metadata.managedFields` left out here):",
            "",
            "```json",
            _json(shown),
            "```",
            "",
            f'Its record (`normalise(obj, cluster="{EXAMPLE_CLUSTER}")`):',
            "",
            "```json",
            _json(record),
            "```",
            RECORD_END,
        ]
    )


def render_record_md(current: str) -> str:
    start = current.find(RECORD_BEGIN)
    end = current.find(RECORD_END)
    if start == -1 or end == -1 or end < start:
        raise SystemExit(f"gen_docs: docs/record.md lacks the markers {RECORD_BEGIN!r} … {RECORD_END!r}")
    return current[:start] + render_record_example() + current[end + len(RECORD_END) :]


# ---- the chart's schema of `config` --------------------------------------------------------------

_SINK_ITEM_NOTE = (
    "A sink of the config file. For a built-in type only the keys it takes (its options, the filter and "
    "pipeline options; docs/sinks.md), and for the values their enum, bounds and JSON types: a typo fails "
    "the install, not the new pod. A number given as text, and a key that is no option's name (it may "
    "hold a credential typed name:value), are judged by the templates. Another type (a plugin) is not "
    "checked here."
)


_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")

# A value the chart's messages may show: short, of a name's characters (the templates' shownValue, for
# an option that is no number). Helm's error for a pattern quotes the value it refuses, so a pattern
# applies to such a value only: another (`level: Warning&password=S3cret`, a key pasted there) is left
# to the templates, which judge it by files/sink-options.json (the same rule) and refuse it unshown.
_SHOWN_VALUE = "^[A-Za-z0-9_.+\\t -]{0,12}$"
_UNSHOWN = {"type": "string", "not": {"pattern": _SHOWN_VALUE}}


def _unquoting(pattern: str) -> dict[str, Any]:
    """A rule of ``pattern`` for a text its error may show, none for another: the ``else`` of its ``if``
    (the templates read it there, for a flag's value too)."""
    return {"if": _UNSHOWN, "else": {"pattern": pattern}}


_VALIDATED_VALUES: dict[str, dict[str, Any]] = {
    # FilterOptions.level is a str its validator checks, ignoring case (no enum in its JSON schema).
    # tests/test_chart_s34.py keeps this equal to what the router takes.
    "level": _unquoting("^(?i:normal|warning)$"),
}


def _reshaped(annotation: Any) -> bool:
    """True when a validator running before the type's own (before, plain, wrap) is in the annotation:
    the values it takes are not those of its JSON schema (kafka's acks=-1, file_mode 7777 read as
    octal)."""
    if typing.get_origin(annotation) is typing.Annotated:
        kinds = (BeforeValidator, PlainValidator, WrapValidator)
        if any(isinstance(m, kinds) for m in annotation.__metadata__):
            return True
    return any(_reshaped(arg) for arg in typing.get_args(annotation))


def _takes(info: FieldInfo, value: Any) -> bool:
    """Whether the field alone (its type, bounds and other constraints, in pydantic's lax mode as the
    router validates) takes ``value``."""
    annotation = typing.Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation
    try:
        TypeAdapter(annotation).validate_python(value)
    except ValidationError:
        return False
    return True


def number_rule(info: FieldInfo, json_type: str) -> dict[str, Any]:
    """The JSON types a number field takes, and its kind: ``number`` (``integer``, ``float``, or
    ``finite``: a float refusing inf and nan) is read by the chart's templates, which judge a text
    (a flag's value, a string in config.sinks) as the router's pydantic does; JSON Schema ignores it.
    Booleans are numbers to pydantic (true is 1): taken when 1 or 0 meets the field, the one that
    does not refused by ``not``."""
    taken = [value for value in (True, False) if _takes(info, value)]
    types = [json_type, "string", *(["boolean"] if taken else []), *(["null"] if _takes(info, None) else [])]
    # Not from its metadata: `allow_inf_nan=False` on a `float | None` field binds nothing.
    finite = json_type != "integer" and not any(_takes(info, x) for x in (float("inf"), float("-inf")))
    rule: dict[str, Any] = {"type": types, "number": "integer" if json_type == "integer" else "float"}
    if finite:
        rule["number"] = "finite"
    if len(taken) == 1:
        rule["not"] = {"const": not taken[0]}
    return rule


def value_constraints(model: type[BaseModel]) -> dict[str, dict[str, Any]]:
    """Each key the model takes (aliases included) → the enum and bounds its JSON schema gives the
    value, for the fields the router checks as declared. ``minimum`` and the like bind numbers only,
    so "10" (which the router reads as 10) still passes the schema (the templates judge a number's
    text: ``number_rule``); an enum keeps null when the field takes it."""
    reshaped = {
        field
        for decorator in model.__pydantic_decorators__.field_validators.values()
        if decorator.info.mode != "after"
        for field in decorator.info.fields
    }
    props = model.model_json_schema(mode="validation", by_alias=False)["properties"]
    found: dict[str, dict[str, Any]] = {}
    for name, info in model.model_fields.items():
        if (
            name in reshaped
            or _reshaped(info.annotation)
            or any(isinstance(m, (BeforeValidator, PlainValidator, WrapValidator)) for m in info.metadata)
        ):
            continue
        prop = props.get(name, {})
        branches = [b for b in prop.get("anyOf", [prop]) if b.get("type") != "null"]
        if len(branches) != 1:
            continue
        branch = branches[0]
        constraint = {k: branch[k] for k in _BOUNDS if k in branch}
        if branch.get("type") in ("integer", "number") and "enum" not in branch:
            constraint.update(number_rule(info, branch["type"]))
        if "enum" in branch:
            nullable = len(prop.get("anyOf", [])) > 1
            constraint["enum"] = [*branch["enum"], *([None] if nullable else [])]
        constraint.update(_VALIDATED_VALUES.get(name, {}))
        if constraint:
            for key in field_keys(name, info) | ({info.alias} if info.alias else set()):
                found[key] = constraint
    return found


def takes_one_value(info: FieldInfo) -> bool:
    """Whether the router reads a one-item list given for the field as its item (config.py's
    ``_coerce_query_value``: a repeated query key, or a YAML list), as it does for every field but a
    list, tuple, set or dict; an empty or longer list it refuses. tests/test_chart_s34.py keeps the
    two in step."""
    origin = getattr(info.annotation, "__origin__", None)
    return origin not in (list, tuple, set, dict) and info.annotation not in (list, dict)


def one_value_keys(model: type[BaseModel]) -> set[str]:
    """The keys of an entry of ``model``'s sink (aliases included) that the router also takes as a
    one-item list. Each key is read by the first of the filter, pipeline and sink models that has it."""
    found: set[str] = set()
    taken: set[str] = set()
    for part in (FilterOptions, PipelineOptions, model):
        for name, info in part.model_fields.items():
            keys = (field_keys(name, info) | ({info.alias} if info.alias else set())) - taken
            if takes_one_value(info):
                found |= keys
            taken |= keys
    return found


def _or_one_item_list(rule: dict[str, Any]) -> dict[str, Any]:
    """``rule``, or a list of one item that meets it: `stream: [stderr]` in YAML is the router's
    `stderr`, and an enum alone refused it (a false refusal of item 280's schema)."""
    return {"if": {"type": "array"}, "then": {"minItems": 1, "maxItems": 1, "items": rule}, "else": rule}


def _rule_name(rule: dict[str, Any]) -> str:
    """A definition's name for ``rule`` (``enum-stdout-stderr``), plain enough for a ``$ref``."""
    if rule.get("if") == _UNSHOWN and set(rule) == {"if", "else"}:
        return _rule_name(rule["else"]) + "-if-shown"
    shown = dict(rule)
    if isinstance(shown.get("not"), dict):  # a number's boolean it refuses: {"const": false}
        shown["not"] = "-".join(f"{k}-{v}" for k, v in shown["not"].items())
    parts = [f"{k}-{'-'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in sorted(shown.items())]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(parts))


_DEFINITIONS = "#/properties/config/definitions/"
_NO_OPTION_NAME = "[^A-Za-z0-9_.-]"  # a character no option's name holds


def _built_in_models() -> dict[str, type[BaseModel]]:
    plugins = {n: p for n, p in discover().items() if p.distribution == BUILTIN_DISTRIBUTION}
    models: dict[str, type[BaseModel]] = {}
    for name in sorted(plugins):
        try:
            models[name] = plugins[name].load().options_model
        except PluginError:
            continue  # as docs/sinks.md says: its entries are left unchecked
    return models


def sink_keys() -> dict[str, dict[str, dict[str, Any]]]:
    """Each built-in type → every key its entry takes (its options, the filter and pipeline options,
    aliases included) → the enum and bounds of its value ({} for none)."""
    common = value_constraints(FilterOptions) | value_constraints(PipelineOptions)
    common_keys = field_names(FilterOptions) | field_names(PipelineOptions)
    found: dict[str, dict[str, dict[str, Any]]] = {}
    for name, model in _built_in_models().items():
        constraints = common | value_constraints(model)
        found[name] = {key: constraints.get(key, {}) for key in sorted(common_keys | field_names(model))}
    return found


def render_config_schema() -> dict[str, Any]:
    """The chart's ``values.schema.json`` ``config``: what ``RouterConfig`` (extra keys forbidden) and
    the sink entries of the built-in types take: their keys, and their values' enum and bounds."""
    props: dict[str, Any] = {}
    for name, prop in RouterConfig.model_json_schema()["properties"].items():
        props[name] = {k: v for k, v in prop.items() if k not in ("title", "default")}
    models = _built_in_models()
    # Each wrapped rule once, referred to by each key that has it: inline, the schema was twice its
    # size (150 kB) and slower to validate at each render.
    definitions: dict[str, Any] = {}
    per_type = []
    for name, keys in sink_keys().items():
        one_value = one_value_keys(models[name])
        rules: dict[str, Any] = {}
        for key, rule in keys.items():
            if rule and key in one_value:
                ref = _rule_name(rule)
                if definitions.setdefault(ref, _or_one_item_list(rule)) != _or_one_item_list(rule):
                    raise ValueError(f"two rules named {ref}")
                rule = {"$ref": _DEFINITIONS + ref}
            rules[key] = rule
        per_type.append(
            {
                "if": {"properties": {"type": {"const": name}}, "required": ["type"]},
                "then": {
                    "properties": dict(sorted(({"type": {}} | rules).items())),
                    # A key that is no option's name (`password:S3cret`, a YAML flow without a space)
                    # is left to the templates, which never print it whole: Helm's error for an
                    # additional property (or a propertyNames pattern) quotes the key.
                    "patternProperties": {_NO_OPTION_NAME: {}},
                    "additionalProperties": False,
                },
            }
        )
    props["sinks"] = {
        "type": "array",
        "items": {
            "type": "object",
            "description": _SINK_ITEM_NOTE,
            "properties": {
                "type": {"type": "string", "minLength": 1},
                "name": {"type": "string"},
                "url": {"type": "string"},
            },
            "required": ["type"],
            "allOf": per_type,
        },
    }
    return {
        "type": "object",
        # A key holding another character (`{token:S3cret}`) is the templates' to refuse unprinted.
        "patternProperties": {_NO_OPTION_NAME: {}},
        "additionalProperties": False,
        "description": (
            "The router's config file; cluster_name/namespaces come from clusterName/watchNamespaces. "
            f"Generated by {REGEN} from RouterConfig and the built-in sinks' option models. An option "
            "of one value may be a list of one item, as the router reads it (definitions)."
        ),
        "properties": props,
        "definitions": dict(sorted(definitions.items())),
    }


def render_sink_options() -> str:
    """The chart's ``files/sink-options.json``: ``sink_keys()`` for the template's check of the ``--sink``
    flags' query (keys, and the values' enum and bounds) and of a number's text in config.sinks. The
    webhook's too: its unknown query keys stay in its URL (``url_query_passthrough``), but the keys
    that are its options the router reads as any sink's (left out, `batch_max_events=0` rendered)."""
    return json.dumps(sink_keys(), indent=1, sort_keys=True) + "\n"


def render_url_query_passthrough() -> str:
    """The chart's ``files/url-query-passthrough.json``: the built-in types whose query keys that are no
    option stay in the URL, which the templates do not refuse as unknown."""
    names = []
    for name, plugin in sorted(discover().items()):
        if plugin.distribution != BUILTIN_DISTRIBUTION:
            continue
        try:
            if getattr(plugin.load(), "url_query_passthrough", False):
                names.append(name)
        except PluginError:
            continue  # as in sink_keys(): its entries are left unchecked
    return json.dumps(names) + "\n"


def render_one_value_options() -> str:
    """The chart's ``files/one-value-options.json``: each built-in type (the webhook's too) → the keys
    of its options of one value. A flag giving one twice (``stream=stderr&stream=stdout``) is refused
    by the router ("given 2 times"), and by the templates before the upgrade; the types listed are
    the built-in ones, whose entries' keys the templates judge."""
    # Not `url`: a flag's query may give it again (after TYPE:URL), and the router keeps the last.
    keys = {name: sorted(one_value_keys(model) - {"url"}) for name, model in _built_in_models().items()}
    return json.dumps(keys, indent=1, sort_keys=True) + "\n"


def render_chart_schema(current: str) -> str:
    """``current`` (the chart's values.schema.json) with its ``config`` generated; the rest is the
    chart's own, kept as written."""
    schema = json.loads(current)
    schema["properties"]["config"] = render_config_schema()
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


# ---- main -----------------------------------------------------------------------------------------


def expected(docs: Path, schema: Path | None = None) -> dict[Path, str]:
    """What each generated file must hold. ``schema`` (the chart's values.schema.json) defaults to the
    one beside ``docs`` when there is one: a docs folder elsewhere (a test's) has none."""
    record = docs / "record.md"
    current = record.read_text(encoding="utf-8") if record.exists() else ""
    files = {docs / "sinks.md": render_sinks(), record: render_record_md(current)}
    schema = schema or docs.resolve().parent / CHART_SCHEMA
    if schema.exists():
        files[schema] = render_chart_schema(schema.read_text(encoding="utf-8"))
        files[schema.parent / SINK_OPTIONS] = render_sink_options()
        files[schema.parent / ONE_VALUE_OPTIONS] = render_one_value_options()
        files[schema.parent / URL_QUERY_PASSTHROUGH] = render_url_query_passthrough()
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="exit 1 if the generated docs are stale")
    parser.add_argument("--docs-dir", type=Path, default=DOCS, help="the docs folder (default: ./docs)")
    parser.add_argument(
        "--chart-schema",
        type=Path,
        default=None,
        help=f"the chart's values.schema.json (default: {CHART_SCHEMA} beside the docs folder, if there)",
    )
    args = parser.parse_args(argv)
    stale: list[str] = []
    for path, text in expected(args.docs_dir, args.chart_schema).items():
        current = path.read_text(encoding="utf-8") if path.exists() else ""
        if current == text:
            continue
        if args.check:
            diff = list(
                difflib.unified_diff(
                    current.splitlines(),
                    text.splitlines(),
                    f"{path} (committed)",
                    f"{path} (generated)",
                    lineterm="",
                )
            )
            stale.append(f"{path} is stale:\n" + "\n".join(diff[:40]) + ("\n..." if len(diff) > 40 else ""))
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if stale:
        print("\n\n".join(stale), file=sys.stderr)
        print(
            f"\nThe generated docs (or the chart's schema) are out of date: run `{REGEN}` and commit the result.",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
