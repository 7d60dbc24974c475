"""Config hashing: determinism, order independence, value sensitivity, nesting, canonical types."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import io
import json
import pathlib
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embtools.config import canonical_json, compute_config_hash, compute_param_hash

# JSON-like values (no NaN/inf: those are refused)
leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    leaves,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
configs = st.dictionaries(st.text(max_size=8), json_values, max_size=6)


def reference_hash(config: dict) -> str:
    """An independent reference for plain JSON configs."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def shuffled(value):
    """The same value with every dict's insertion order shuffled."""
    if isinstance(value, dict):
        items = list(value.items())
        random.shuffle(items)
        return {k: shuffled(v) for k, v in items}
    if isinstance(value, list):
        return [shuffled(v) for v in value]
    return value


@settings(max_examples=200, deadline=None)
@given(configs)
def test_matches_reference_and_is_deterministic(config):
    h = compute_config_hash(config)
    assert len(h) == 16 and all(c in "0123456789abcdef" for c in h)
    assert h == compute_config_hash(config)
    assert h == reference_hash(config)


@settings(max_examples=200, deadline=None)
@given(configs)
def test_key_order_does_not_matter(config):
    assert compute_config_hash(shuffled(config)) == compute_config_hash(config)


@settings(max_examples=200, deadline=None)
@given(configs, st.text(max_size=8), json_values, json_values)
def test_value_sensitivity(config, key, a, b):
    if canonical_json(a) == canonical_json(b):
        return
    assert compute_config_hash({**config, key: a}) != compute_config_hash({**config, key: b})


@settings(max_examples=100, deadline=None)
@given(configs, st.text(min_size=1, max_size=8))
def test_nesting_is_not_flattened(config, key):
    nested = {key: config}
    assert compute_config_hash(nested) == reference_hash(nested)
    if config:
        assert compute_config_hash(nested) != compute_config_hash(config)


def test_param_hash_equals_dict_hash():
    assert compute_param_hash(model="m", dims=[64, 384]) == compute_config_hash(
        {"dims": [64, 384], "model": "m"}
    )


def test_canonical_types():
    base = compute_config_hash({"dims": [64, 384], "lr": 0.1, "n": 3, "ok": True})
    assert base == compute_config_hash(
        {"dims": (np.int64(64), np.int32(384)), "lr": np.float64(0.1), "n": np.int16(3), "ok": np.bool_(True)}
    )
    assert base == compute_config_hash({"dims": np.array([64, 384]), "lr": 0.1, "n": 3, "ok": True})
    # np.float32(0.1) is a different number from 0.1 and must hash differently
    assert base != compute_config_hash({"dims": [64, 384], "lr": np.float32(0.1), "n": 3, "ok": True})
    # bool and int are distinct JSON values
    assert compute_config_hash({"a": 1}) != compute_config_hash({"a": True})


def test_paths_enums_dataclasses_sets():
    class Metric(enum.Enum):
        COSINE = "cosine"

    @dataclasses.dataclass
    class Run:
        metric: Metric
        out: pathlib.Path
        dims: tuple[int, ...]

    run = Run(Metric.COSINE, pathlib.Path("runs") / "a", (64, 128))
    assert compute_config_hash({"run": run}) == compute_config_hash(
        {"run": {"metric": "cosine", "out": "runs/a", "dims": [64, 128]}}
    )
    assert compute_config_hash({"s": {3, 1, 2}}) == compute_config_hash({"s": [1, 2, 3]})


@pytest.mark.parametrize(
    ("config", "path"),
    [
        ({"fn": print}, "config['fn']"),
        ({"a": {"b": [1, lambda: 0]}}, "config['a']['b'][1]"),
        ({"a": [float("nan")]}, "config['a'][0]"),
        ({"a": np.float64("nan")}, "config['a']"),
        ({"a": float("inf")}, "config['a']"),
        ({"a": {1: "x"}}, "config['a']"),
        ({"a": np.array(["x"], dtype=object)}, "config['a']"),
    ],
)
def test_unsupported_values_name_their_path(config, path):
    with pytest.raises(TypeError) as err:
        compute_config_hash(config)
    assert path in str(err.value)


def test_open_file_is_refused():
    with io.StringIO("x") as handle, pytest.raises(TypeError, match=r"config\['f'\]"):
        compute_config_hash({"f": handle})


def test_non_mapping_is_refused():
    with pytest.raises(TypeError, match="mapping"):
        compute_config_hash([1, 2])  # type: ignore[arg-type]
