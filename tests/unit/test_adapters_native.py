"""Which checkpoints the project's own forwards serve (adapters/native/__init__.py): a
model directory whose config's model_type has a native loader, each described for the
reference's `loaded_as`; anything else (another type, no config) is left to transformers.
The InternLM2 forward itself is tested in test_native_internlm2.py."""

from __future__ import annotations

import json

import pytest

from adapters.native import DESCRIPTIONS, NATIVE, native_type


@pytest.mark.parametrize(("config", "expected"), [
    ({"model_type": "internlm2", "architectures": ["InternLM2ForCausalLM"]}, "internlm2"),
    ({"model_type": "llama"}, None),
    ({}, None),
    (None, None),  # not a model directory
])
def test_a_native_forward_serves_its_model_types_only(tmp_path, config, expected):
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    assert native_type(tmp_path) == expected


def test_every_native_forward_is_described_and_loadable():
    assert set(DESCRIPTIONS) == set(NATIVE) and all(callable(load) for load in NATIVE.values())
