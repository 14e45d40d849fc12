"""``eventrouter.testing.pipelines.Knobs`` lists the PipelineOptions fields by hand (a TypedDict, for
mypy): it must follow the model, or a new pipeline option cannot be set by a test (mypy refuses the
key) and a renamed one is still offered to tests, refused only when validated."""

from __future__ import annotations

import types
import typing

from eventrouter.options import PipelineOptions
from eventrouter.testing.pipelines import Knobs

NOT_KNOBS = {"name"}
"""Fields a test does not set through ``pipeline_for``: its ``name`` argument names the pipeline."""


def test_knobs_are_exactly_the_pipeline_options_a_test_may_set_with_the_models_types() -> None:
    fields = PipelineOptions.model_fields
    knobs = typing.get_type_hints(Knobs)
    assert set(knobs) == set(fields) - NOT_KNOBS, (
        f"Knobs: add {sorted(set(fields) - NOT_KNOBS - set(knobs))}, remove {sorted(set(knobs) - set(fields))}"
    )
    assert not Knobs.__required_keys__  # any subset, the model's defaults for the rest
    for name, knob in knobs.items():
        annotation = fields[name].annotation
        # An optional field (None: the default) is set to a value of its type.
        if isinstance(annotation, types.UnionType) and type(None) in typing.get_args(annotation):
            (annotation,) = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        assert knob is annotation, (name, knob, annotation)
