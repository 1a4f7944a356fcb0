"""The forest kernel must behave exactly like LightGBM's ``Booster.predict``.

Each model from ``conftest.py`` is checked against LightGBM itself and against a slow,
independent Python walk of the text model (``reference_raw``, written from LightGBM's
``tree.h``), on Hypothesis rows full of NaN, infinities, signed zeros, values next to
the thresholds and unseen categories.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from riskwire.kernels.forest import PARALLEL_MIN_ROWS, Forest, UnsupportedModelError

CAT_COLUMNS = (4, 5)  # code columns of the conftest models
K_ZERO = 1.0000000180025095e-35  # LightGBM's kZeroThreshold (float 1e-35 as double)
TOL = 1e-9
MODELS = (
    "numeric",
    "zero_as_missing",
    "no_missing",
    "nan",
    "categorical",
    "stumps",
    "many_trees",
    "regression",
    "random_forest",
    "handmade",
)


# ------------------------------------------------------------------ reference evaluator
@functools.cache
def _reference_trees(text: str) -> list[dict[str, list[float]]]:
    """The ``Tree=`` blocks of a model text as {field: values}."""
    trees, current = [], None
    for line in text.splitlines():
        if line.startswith("Tree="):
            current = {}
            trees.append(current)
        elif line.startswith("end of trees"):
            break
        elif current is not None and "=" in line:
            key, value = line.split("=", 1)
            current[key] = [float(v) for v in value.split()]
    return trees


def _int_cast(value: float) -> int:
    """C++ static_cast<int>(double) on x86: truncation, INT_MIN when out of range."""
    if math.isnan(value) or not -(2.0**31) < value < 2.0**31:
        return -(2**31)
    return int(value)


def _reference_tree(tree: dict[str, list[float]], row: list[float]) -> float:
    if int(tree["num_leaves"][0]) == 1:
        return tree["leaf_value"][0]
    node = 0
    while node >= 0:
        fval = row[int(tree["split_feature"][node])]
        dtype = int(tree["decision_type"][node])
        left, right = int(tree["left_child"][node]), int(tree["right_child"][node])
        if dtype & 1:  # CategoricalDecision
            code = _int_cast(fval)
            start, stop = (
                int(b) for b in tree["cat_boundaries"][int(tree["threshold"][node]) :][:2]
            )
            words = tree["cat_threshold"][start:stop]
            found = (
                code >= 0 and code // 32 < len(words) and (int(words[code // 32]) >> code % 32) & 1
            )
            node = left if found else right
            continue
        missing_type = (dtype >> 2) & 3  # NumericalDecision
        if math.isnan(fval) and missing_type != 2:
            fval = 0.0
        if (missing_type == 1 and -K_ZERO <= fval <= K_ZERO) or (
            missing_type == 2 and math.isnan(fval)
        ):
            node = left if dtype & 2 else right
        else:
            node = left if fval <= tree["threshold"][node] else right
    return tree["leaf_value"][~node]


def reference_raw(text: str, X: np.ndarray) -> np.ndarray:
    """Raw scores by walking the text model in Python, as LightGBM's C++ does."""
    trees = _reference_trees(text)
    out = []
    for row in X:
        # LightGBM's dense-row reader keeps only |x| > kZeroThreshold or NaN; the rest is 0.
        values = [v if (abs(v) > K_ZERO or math.isnan(v)) else 0.0 for v in row.tolist()]
        total = 0.0
        for tree in trees:
            total += _reference_tree(tree, values)
        out.append(total)
    return np.array(out)


# ------------------------------------------------------------------ fixtures and helpers
@pytest.fixture(scope="module")
def boosters(forest_model_texts: dict[str, str]) -> dict[str, lgb.Booster]:
    return {name: lgb.Booster(model_str=text) for name, text in forest_model_texts.items()}


@pytest.fixture(scope="module")
def forests(forest_model_texts: dict[str, str]) -> dict[str, Forest]:
    return {name: Forest.from_model_string(text) for name, text in forest_model_texts.items()}


@functools.cache
def interesting_values(text: str) -> list[float]:
    """Thresholds and their neighbours, zeros, the zero band, category edge cases."""
    values = [0.0, -0.0, K_ZERO, -K_ZERO, 1e-40, -1e-40, 8e-36, -8e-36, 0.5, -0.5, -0.999]
    values += [-1.0, 1.0, 2.0, 3.0, 31.0, 32.0, 33.0, 100.0, 700.0, 2999.0, 3000.0, 1e6]
    values += [2.0**31 - 1, 2.0**31, -(2.0**31), 1e300, -1e300, math.inf, -math.inf, math.nan]
    for tree in _reference_trees(text):
        for t in tree.get("threshold", [])[:40]:
            values += [t, math.nextafter(t, math.inf), math.nextafter(t, -math.inf)]
    return values


def random_rows(n: int, seed: int) -> np.ndarray:
    """Rows with NaN, ±inf, zeros, far-out values, unseen/negative/fractional codes."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 6)) * rng.choice([1.0, 1.0, 1.0, 50.0], size=(n, 6))
    X[rng.random((n, 6)) < 0.1] = 0.0
    X[:, 4] = rng.integers(-3, 70, n) + rng.choice([0.0, 0.0, 0.5, -0.5], n)
    X[:, 5] = rng.choice([0, 1, 2, 3, 700, 1500, 2999, 3000, 5000, -1, 2**31, 1e12], n)
    special = rng.random(X.shape)
    X[special < 0.02] = np.inf
    X[(special >= 0.02) & (special < 0.04)] = -np.inf
    X[(special >= 0.04) & (special < 0.14)] = np.nan
    return X


# ------------------------------------------------------------------ exactness
@pytest.mark.parametrize("name", MODELS)
def test_matches_lightgbm_on_random_rows(name, forests, boosters):
    X = random_rows(5000, seed=MODELS.index(name))
    forest, booster = forests[name], boosters[name]
    np.testing.assert_allclose(
        forest.predict(X, raw_score=True), booster.predict(X, raw_score=True), rtol=0, atol=TOL
    )
    np.testing.assert_allclose(forest.predict(X), booster.predict(X), rtol=0, atol=TOL)


@pytest.mark.parametrize("name", MODELS)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_hypothesis_rows_match_lightgbm_and_reference(
    name, data, forest_model_texts, forests, boosters
):
    text = forest_model_texts[name]
    element = st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from(interesting_values(text)),
        st.integers(-2, 3100).map(float),
    )
    shape = (data.draw(st.integers(1, 6)), forests[name].num_feature())
    X = data.draw(arrays(np.float64, shape, elements=element))
    ours = forests[name].predict(X, raw_score=True)
    np.testing.assert_allclose(ours, boosters[name].predict(X, raw_score=True), rtol=0, atol=TOL)
    np.testing.assert_allclose(ours, reference_raw(text, X), rtol=0, atol=TOL)


def test_100k_rows_categorical_nan_model(forests, boosters):
    X = random_rows(100_000, seed=7)
    ours = forests["categorical"].predict(X, raw_score=True, num_threads=1)
    expected = boosters["categorical"].predict(X, raw_score=True, num_threads=1)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL)


def test_reference_agrees_with_lightgbm(forest_model_texts, boosters):
    """The reference itself is right (so the Hypothesis comparison means something)."""
    X = random_rows(300, seed=3)
    for name in ("categorical", "zero_as_missing", "handmade"):
        np.testing.assert_allclose(
            reference_raw(forest_model_texts[name], X),
            boosters[name].predict(X, raw_score=True),
            rtol=0,
            atol=TOL,
        )


def test_handmade_edge_cases(forests, boosters):
    """Zero band, categorical truncation and out-of-range codes, single-leaf trees."""
    rows = [
        [v, v, v, v, c, c]
        for v in (0.0, -0.0, 1e-40, -8e-36, K_ZERO, -2e-35, math.nan)
        for c in (0.0, -0.5, -1.0, 1.9, 31.0, 32.0, 33.0, 100.0, 127.0, 128.0, 2.0**31, math.nan)
    ]
    X = np.array(rows)
    np.testing.assert_array_equal(
        forests["handmade"].predict(X, raw_score=True),
        boosters["handmade"].predict(X, raw_score=True),
    )


# ------------------------------------------------------------------ paths agree bit for bit
@pytest.mark.parametrize("name", ["categorical", "zero_as_missing", "many_trees", "handmade"])
def test_single_row_equals_batch(name, forests):
    forest = forests[name]
    X = random_rows(300, seed=11)
    batch_prob, batch_raw = forest.predict(X), forest.predict(X, raw_score=True)
    assert [forest.predict_row(x) for x in X] == batch_prob.tolist()
    assert [forest.predict_raw_row(x) for x in X] == batch_raw.tolist()
    for n in (1, 2, 3, 15, 16, 17, 63, 64, 65, 80):  # small blocks: trees are the lanes
        assert forest.predict(X[:n], raw_score=True).tolist() == batch_raw[:n].tolist()


def test_read_only_input_is_accepted(forests):
    """Rows straight from a network buffer (np.frombuffer) are read-only."""
    X = random_rows(40, seed=3)
    frozen = np.frombuffer(X.tobytes(), dtype=np.float64).reshape(X.shape)
    assert not frozen.flags.writeable
    forest = forests["categorical"]
    assert forest.predict(frozen).tolist() == forest.predict(X).tolist()


def test_parallel_equals_single_thread(forests):
    X = random_rows(PARALLEL_MIN_ROWS * 2 + 17, seed=5)
    forest = forests["categorical"]
    serial = forest.predict(X, num_threads=1)
    assert forest.predict(X).tolist() == serial.tolist()
    assert forest.predict(X, num_threads=2).tolist() == serial.tolist()


def test_input_layouts_and_dtypes_are_converted(forests):
    forest = forests["numeric"]
    X = random_rows(100, seed=2)
    expected = forest.predict(X)
    np.testing.assert_array_equal(forest.predict(np.asfortranarray(X)), expected)
    np.testing.assert_array_equal(
        forest.predict(X.astype(np.float32)),
        forest.predict(X.astype(np.float32).astype(np.float64)),
    )
    np.testing.assert_array_equal(forest.predict(X.tolist()), expected)
    wide = np.repeat(X, 2, axis=1)[:, ::2]  # a strided view
    np.testing.assert_array_equal(forest.predict(wide), expected)
    assert forest.predict_row(wide[0]) == expected[0]
    assert forest.predict_row(X[0].tolist()) == expected[0]
    assert forest.predict(np.empty((0, 6))).shape == (0,)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros(6),
        np.zeros((2, 5)),
        np.zeros((2, 7)),
        np.zeros((1, 2, 6)),
        np.array([["a"] * 6]),
        np.zeros((2, 6), dtype=complex),
    ],
)
def test_bad_batches_raise_value_error(forests, bad):
    with pytest.raises(ValueError, match="X must be"):
        forests["numeric"].predict(bad)


@pytest.mark.parametrize("bad", [np.zeros(5), np.zeros((1, 6)), np.array(["a"] * 6), [1.0] * 7])
def test_bad_rows_raise_value_error(forests, bad):
    forest = forests["numeric"]
    for method in (forest.predict_row, forest.predict_raw_row, forest.contributions_row):
        with pytest.raises(ValueError, match="x must be"):
            method(bad)


def test_bad_num_threads(forests):
    with pytest.raises(ValueError, match="num_threads"):
        forests["numeric"].predict(np.zeros((1, 6)), num_threads=-1)


# ------------------------------------------------------------------ model handling
@pytest.mark.parametrize("name", MODELS)
def test_booster_like_attributes(name, forests, boosters):
    forest, booster = forests[name], boosters[name]
    assert forest.num_feature() == booster.num_feature()
    assert forest.num_trees() == booster.num_trees()
    assert forest.feature_name() == booster.feature_name()


def test_constructors_agree(tmp_path, forest_model_texts, forests):
    text = forest_model_texts["categorical"]
    path = tmp_path / "model.txt"
    path.write_text(text)
    X = random_rows(200, seed=1)
    expected = forests["categorical"].predict(X)
    np.testing.assert_array_equal(Forest.from_model_file(path).predict(X), expected)
    booster = lgb.Booster(model_str=text)
    np.testing.assert_array_equal(Forest.from_booster(booster).predict(X), expected)
    with pytest.raises(TypeError, match="lightgbm.Booster"):
        Forest.from_booster(object())


@pytest.mark.parametrize("name", ["categorical", "random_forest", "handmade"])
def test_save_load_round_trip(name, tmp_path, forests, forest_model_texts):
    forest = forests[name]
    forest.save(tmp_path / "a.npz")
    loaded = Forest.load(tmp_path / "a.npz")
    X = random_rows(500, seed=4)
    assert loaded.predict(X).tolist() == forest.predict(X).tolist()
    assert loaded.feature_name() == forest.feature_name()
    assert loaded.expected_value() == forest.expected_value()
    with np.load(tmp_path / "a.npz", allow_pickle=False) as data:
        assert {"nodes", "trees", "cat_bits", "feature_names"} <= set(data.files)
    # Byte-identical: from the saved file, and from a fresh conversion of the model.
    loaded.save(tmp_path / "b.npz")
    Forest.from_model_string(forest_model_texts[name]).save(tmp_path / "c.npz")
    blob = (tmp_path / "a.npz").read_bytes()
    assert (tmp_path / "b.npz").read_bytes() == blob == (tmp_path / "c.npz").read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_load_refuses_corrupt_files(tmp_path, forests):
    forests["categorical"].save(tmp_path / "ok.npz")
    with np.load(tmp_path / "ok.npz") as data:
        fields = {k: data[k] for k in data.files}

    def write(name: str, **changes) -> Path:
        path = tmp_path / name
        np.savez(path, **{**fields, **changes})
        return path

    nodes = fields["nodes"].copy()
    nodes[0, 3] = 10**6  # a child index out of range
    with pytest.raises(ValueError, match="valid trees"):
        Forest.load(write("child.npz", nodes=nodes))
    cat = np.flatnonzero(((fields["nodes"][:, 2] >> 24) & 3) == 3)[0]
    nodes = fields["nodes"].copy()
    nodes[cat, 1] = 10**6  # a bitset running past cat_bits
    with pytest.raises(ValueError, match="valid trees"):
        Forest.load(write("bits.npz", nodes=nodes))
    with pytest.raises(ValueError, match="format"):
        Forest.load(write("version.npz", format_version=np.int64(99)))
    trees = fields["trees"].copy()
    trees[:, 1] = 0  # depths too small for the trees
    with pytest.raises(ValueError, match="deeper"):
        Forest.load(write("depth.npz", trees=trees))


def _train_text(params: dict) -> str:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 3))
    y = (X[:, 0] > 0).astype(int) + (X[:, 1] > 0) * ("num_class" in params)
    base = {"num_leaves": 4, "verbose": -1, "num_threads": 1, "seed": 0}
    return lgb.train({**base, **params}, lgb.Dataset(X, y), num_boost_round=2).model_to_string()


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"objective": "multiclass", "num_class": 3}, "multiclass"),
        ({"objective": "binary", "linear_tree": True}, "linear"),
        ({"objective": "regression", "reg_sqrt": True}, "not supported"),
        ({"objective": "poisson"}, "not supported"),
        ({"objective": "cross_entropy"}, "not supported"),
    ],
)
def test_unsupported_models_are_refused(params, message):
    with pytest.raises(UnsupportedModelError, match=message):
        Forest.from_model_string(_train_text(params))


def test_malformed_text_is_refused(forest_model_texts):
    text = forest_model_texts["numeric"]
    with pytest.raises(ValueError, match="truncated"):
        Forest.from_model_string(text[: text.index("end of trees")])
    with pytest.raises(ValueError, match="not a LightGBM"):
        Forest.from_model_string("hello")
    with pytest.raises(ValueError, match="tree 0"):
        Forest.from_model_string(text.replace("left_child=", "left_child=0 ", 1))


# ------------------------------------------------------------------ reason codes
@pytest.mark.parametrize("name", ["categorical", "zero_as_missing", "many_trees", "handmade"])
def test_contributions_add_up_to_raw_score(name, forests, boosters):
    forest, booster = forests[name], boosters[name]
    X = random_rows(300, seed=9)
    contributions = np.array([forest.contributions_row(x) for x in X])
    raw = forest.predict(X, raw_score=True)
    np.testing.assert_allclose(contributions.sum(axis=1), raw, rtol=0, atol=1e-9)
    # The base value is the sum of the root values, LightGBM's expected value.
    np.testing.assert_allclose(contributions[:, -1], forest.expected_value(), rtol=0, atol=0)
    lgb_base = booster.predict(X[:5], pred_contrib=True)[:, -1]
    np.testing.assert_allclose(lgb_base, forest.expected_value(), rtol=0, atol=1e-9)


def test_contributions_are_exact_shap_for_stumps(forests, boosters):
    X = random_rows(500, seed=12)
    ours = np.array([forests["stumps"].contributions_row(x) for x in X])
    np.testing.assert_allclose(
        ours, boosters["stumps"].predict(X, pred_contrib=True), rtol=0, atol=1e-9
    )


def test_top_reasons(forests):
    forest = forests["categorical"]
    for x in random_rows(50, seed=13):
        contributions = forest.contributions_row(x)[:-1]
        reasons = forest.top_reasons(x, 3)
        assert len(reasons) <= 3
        assert [c for _, c in reasons] == sorted((c for _, c in reasons), reverse=True)
        assert all(c > 0 and contributions[j] == c for j, c in reasons)
        positive = np.sort(contributions[contributions > 0])[::-1][:3]
        assert [c for _, c in reasons] == positive.tolist()
    assert forest.top_reasons(x, 0) == []
    with pytest.raises(ValueError, match="k must be"):
        forest.top_reasons(x, -1)


@pytest.mark.parametrize(
    "name", ["categorical", "nan", "zero_as_missing", "many_trees", "handmade"]
)
def test_predict_row_reasons_fuses_predict_and_top_reasons(name, forests):
    """The serving path's single call equals predict_row bit for bit and top_reasons."""
    forest = forests[name]
    top_index, top_value = np.empty(10, np.int64), np.empty(10)
    scratch = np.empty(forest.num_feature() + 1)
    for x in random_rows(60, seed=21):
        for k in (1, 3, 10):
            probability = forest.predict_row_reasons(x, k, top_index, top_value, scratch)
            assert probability == forest.predict_row(x)
            expected = forest.top_reasons(x, k)
            got = [
                (int(j), float(v))
                for j, v in zip(top_index[:k], top_value[:k], strict=True)
                if j >= 0
            ]
            assert got == expected
            assert all(j == -1 for j in top_index[len(expected) : k])


def test_categorical_columns_are_used(forests):
    """Guard the fixtures: the categorical model really splits on both code columns."""
    text_features = forests["categorical"]._arrays.nodes[:, 2]
    cat_nodes = ((text_features >> 24) & 3) == 3
    assert set((text_features[cat_nodes] & 0xFFFFFF).tolist()) == set(CAT_COLUMNS)
