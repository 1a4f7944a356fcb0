"""Small deterministic LightGBM models for the forest kernel tests.

Every model is trained once per session (num_threads=1, fixed seeds, a few hundred
rows) and handed out as its native text dump, ``forest_model_texts[name]``. One more,
"handmade", is written by hand to reach cases training rarely produces: single-leaf
trees, thresholds inside LightGBM's zero band, missing_type Zero with both default
directions, and a categorical bitset several words long.
"""

from __future__ import annotations

import lightgbm as lgb
import numpy as np
import pytest

N_FEATURES = 6
CAT_COLUMNS = (4, 5)  # in the "categorical" model: codes up to ~40 and up to ~3000


def forest_data(n: int, seed: int, *, zeros: float = 0.0, nans: float = 0.0) -> np.ndarray:
    """Rows with numeric columns 0-3 and integer codes in columns 4-5."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, N_FEATURES))
    X[:, 4] = rng.integers(0, 40, n)
    X[:, 5] = rng.choice([0, 1, 2, 3, 700, 1500, 2999], n)
    X[:, :4][rng.random((n, 4)) < zeros] = 0.0
    X[:, :4][rng.random((n, 4)) < nans] = np.nan
    return X


def forest_labels(X: np.ndarray, seed: int) -> np.ndarray:
    """Binary labels that depend on every column, NaN and zeros included."""
    rng = np.random.default_rng(seed + 1)
    x = np.nan_to_num(X, nan=-1.5)
    logit = x[:, 0] - x[:, 1] * x[:, 2] + (x[:, 3] == 0) + (x[:, 4] % 3 == 0) - (x[:, 5] > 500)
    return (rng.random(len(X)) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int32)


def _train(
    params: dict,
    rounds: int,
    *,
    seed: int = 0,
    zeros: float = 0.0,
    nans: float = 0.0,
    categorical: tuple[int, ...] = (),
    n: int = 600,
) -> str:
    X = forest_data(n, seed, zeros=zeros, nans=nans)
    y = forest_labels(X, seed)
    if params.get("objective") == "regression":
        y = y + np.nan_to_num(X[:, 0])
    base = {
        "objective": "binary",
        "num_leaves": 7,
        "min_data_in_leaf": 5,
        "seed": seed,
        "deterministic": True,
        "num_threads": 1,
        "verbose": -1,
        "min_data_per_group": 5,
        "cat_smooth": 1.0,
        "max_cat_to_onehot": 2,
    }
    data = lgb.Dataset(X, y, categorical_feature=list(categorical) or "auto")
    return lgb.train({**base, **params}, data, num_boost_round=rounds).model_to_string()


HANDMADE = """tree
version=v4
num_class=1
num_tree_per_iteration=1
label_index=0
max_feature_idx=5
objective=binary sigmoid:0.75
feature_names=a b c d cat_small cat_big
feature_infos=none none none none none none

Tree=0
num_leaves=1
num_cat=0
split_feature=
split_gain=
threshold=
decision_type=
left_child=
right_child=
leaf_value=0.25
leaf_weight=
leaf_count=100
internal_value=
internal_weight=
internal_count=
is_linear=0
shrinkage=1


Tree=1
num_leaves=4
num_cat=0
split_feature=0 1 2
split_gain=1 1 1
threshold=-5.0000000000000001e-36 5.0000000000000001e-36 -1.0000000180025095e-35
decision_type=2 4 6
left_child=1 -1 -3
right_child=2 -2 -4
leaf_value=0.1 -0.2 0.30000000000000004 -0.4
leaf_weight=1 1 1 1
leaf_count=10 20 30 40
internal_value=0 0 0
internal_weight=0 0 0
internal_count=100 30 70
is_linear=0
shrinkage=0.1


Tree=2
num_leaves=5
num_cat=2
split_feature=4 5 3 1
split_gain=1 1 1 1
threshold=0 1 1.0000000180025095e-35 -0.5
decision_type=1 1 4 8
left_child=1 -1 -3 -4
right_child=2 -2 3 -5
leaf_value=1 -1 0.5 -0.5 0.125
leaf_weight=1 1 1 1 1
leaf_count=5 15 25 35 20
internal_value=0 0 0 0
internal_weight=0 0 0 0
internal_count=100 20 80 55
cat_boundaries=0 1 5
cat_threshold=5 1 0 0 4096
is_linear=0
shrinkage=0.1


Tree=3
num_leaves=1
num_cat=0
split_feature=
split_gain=
threshold=
decision_type=
left_child=
right_child=
leaf_value=-0.0625
leaf_weight=
leaf_count=100
internal_value=
internal_weight=
internal_count=
is_linear=0
shrinkage=1


end of trees
"""


def _trained_models() -> dict[str, str]:
    return {
        "numeric": _train({}, 25),
        "zero_as_missing": _train({"zero_as_missing": True}, 25, zeros=0.3, nans=0.05),
        "no_missing": _train({"use_missing": False}, 25, nans=0.1),
        "nan": _train({}, 25, nans=0.15),
        "categorical": _train({"num_leaves": 15}, 40, nans=0.1, zeros=0.1, categorical=CAT_COLUMNS),
        "stumps": _train({"num_leaves": 2}, 30, nans=0.1, categorical=CAT_COLUMNS),
        "many_trees": _train({"num_leaves": 4, "learning_rate": 0.05}, 300, nans=0.05),
        "regression": _train({"objective": "regression"}, 15, nans=0.05),
        "random_forest": _train(
            {"boosting": "rf", "bagging_fraction": 0.7, "bagging_freq": 1}, 10, nans=0.05
        ),
        "handmade": HANDMADE,
    }


@pytest.fixture(scope="session")
def forest_model_texts() -> dict[str, str]:
    """LightGBM text dumps of the test models, by name."""
    return _trained_models()
