"""eventrouter: every Kubernetes Event occurrence, routed to pluggable sinks, none lost.

The public surface for sink plugins is this module: subclass ``Sink``, describe the options in a
``SinkOptions`` model, return ``Outcome``s. See docs/writing-a-sink.md.
"""

from eventrouter.memory import BoundedCache
from eventrouter.options import FilterOptions, PipelineOptions, Secret, SinkOptions
from eventrouter.record import Occurrence, normalise
from eventrouter.retry_after import parse_retry_after
from eventrouter.sink import (
    OK,
    Outcome,
    OutcomeKind,
    RetryableError,
    Sink,
    SinkContext,
    SinkError,
    reject,
    retry,
)

__version__ = "0.1.0"

__all__ = [
    "OK",
    "BoundedCache",
    "FilterOptions",
    "Occurrence",
    "Outcome",
    "OutcomeKind",
    "PipelineOptions",
    "RetryableError",
    "Secret",
    "Sink",
    "SinkContext",
    "SinkError",
    "SinkOptions",
    "normalise",
    "parse_retry_after",
    "reject",
    "retry",
]
