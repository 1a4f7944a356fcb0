"""Compiled LightGBM forests: flat arrays plus Numba kernels, named like ``lightgbm.Booster``.

``Forest`` predicts exactly what ``Booster.predict`` does for binary (sigmoid) and plain
regression models, NaN/inf/zero routing and categorical bitsets included. The node
layout and the missing-value rules are described in :mod:`.forest_convert`.

A walk moves "lanes" one step at a time: the rows of a block of ``_BLOCK_ROWS`` rows
through one tree (so the tree stays in L1), or one row through all trees. Lanes are
independent, so the CPU overlaps their memory loads, and each step is branch-free
(``&``/``|`` and float selects, so LLVM emits no data-dependent jumps). After each step
the lanes that reached a leaf are dropped, since LightGBM's leaf-wise trees are ragged,
and the rest are sorted by the class of their node, so plain numerical splits take
the cheap step and only categorical or zero-as-missing splits pay for the general one.
Batches of ``PARALLEL_MIN_ROWS`` rows or more are split over threads (``prange``).

Reason codes use Saabas path attribution: walking a row's path, each split's feature
is credited with the change in the node's expected value (row-count-weighted mean leaf
output, as in LightGBM's TreeSHAP). Per tree the credits telescope, so the
contributions plus the base value (last entry) add up to the raw score. This is exact
SHAP for single-split trees and a cheap approximation otherwise.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numba
import numpy as np
from numba import int64, njit, prange, uint32, uint64

from .forest_convert import (
    CLASS_CAT,
    CLASS_LEAF,
    CLASS_PLAIN,
    CLASS_SHIFT,
    CLASS_ZERO,
    FEATURE_MASK,
    FLAG_MISSING_RIGHT,
    K_ZERO_THRESHOLD,
    OBJECTIVE_SIGMOID,
    ForestArrays,
    UnsupportedModelError,
    build_arrays,
    check_arrays,
    load_arrays,
    parse_model_text,
    save_arrays,
)

__all__ = ["PARALLEL_MIN_ROWS", "Forest", "UnsupportedModelError"]

PARALLEL_MIN_ROWS = 4096  # smaller batches are scored on the calling thread
_BLOCK_ROWS = 64
_SMALL_BLOCK_ROWS = 16  # fewer rows than this: walk each row's trees as the lanes
_F64 = np.dtype(np.float64)
_ROW_STRIDES = (8,)
_OUT_RAW = 0  # raw scores (raw_score=True)
_OUT_SIGMOID = 1  # binary: probabilities
_OUT_IDENTITY = 2  # regression

# ---------------------------------------------------------------------------- kernels
# nodes: uint32 (n*4) node records; slots: the same memory as float64 (n*2).
# Lanes are uint64 ``node << 32 | owner``; indexes are unsigned so Numba emits no
# negative-index wraparound code.
_MODEL = "uint32[::1], float64[::1], int32[:, ::1], uint32[::1]"
_ROW_SIG = f"float64(float64[::1], {_MODEL}, int64, float64, float64)"
_BATCH_SIG = f"void(float64[::1], int64, {_MODEL}, int64, float64, float64, float64[::1])"
_U1, _U2, _U3, _U4, _U32 = uint64(1), uint64(2), uint64(3), uint64(4), uint64(32)
_LOW32 = uint64(0xFFFFFFFF)
_FEATURE = uint32(FEATURE_MASK)
_MISSING_RIGHT = uint32(FLAG_MISSING_RIGHT)
_CHILD_SHIFT = uint32(CLASS_SHIFT + 2)


@njit(cache=True, nogil=True)
def _right_plain(x, nd, word, slots):
    """1 if ``x`` goes right at numerical split ``nd`` (no zero band), else 0."""
    return uint32((x > slots[nd * _U2]) | ((x != x) & ((word & _MISSING_RIGHT) != 0)))


@njit(cache=True, nogil=True)
def _right_zero(x, nd, word, slots):
    """As :func:`_right_plain`, where ``|x| <= kZeroThreshold`` also counts as missing."""
    missing = (x != x) | (abs(x) <= K_ZERO_THRESHOLD)
    to_missing = missing & ((word & _MISSING_RIGHT) != 0)
    return uint32(to_missing | ((not missing) & (x > slots[nd * _U2])))


@njit(cache=True, nogil=True)
def _right_cat(x, nd, nodes, cat_bits):
    """1 if ``x`` goes right at categorical split ``nd``: its code is not in the set.

    As C++ ``static_cast<int>``: NaN, x <= -1 and codes past the bitset go right, and
    (-1, 0) reads as code 0. The clamps keep the bitset read in bounds for any x.
    """
    n_bits = float(nodes[nd * _U4 + _U1]) * 32.0
    in_range = (x > -1.0) & (x < n_bits)
    code = x if x > 0.0 else 0.0
    code = code if code < n_bits - 1.0 else n_bits - 1.0
    c = uint64(int64(code))
    word = cat_bits[uint64(nodes[nd * _U4]) + (c >> uint64(5))]
    return uint32(not (in_range & (((word >> uint32(c & uint64(31))) & uint32(1)) != 0)))


@njit(cache=True, nogil=True)
def _walk(X, base, nodes, slots, cat_bits, lanes, counts, leaf, max_steps):
    """Step every lane to its leaf; ``leaf[owner]`` receives the lane's last node.

    ``lanes`` is uint64 (2, 3, cap): two buffers of plain / zero / categorical lists,
    ``counts`` their first buffer's lengths. Lane ``owner`` reads feature f of its row
    at ``X[base[owner] + f]``.
    """
    src = 0
    n_plain, n_zero, n_cat = uint64(counts[0]), uint64(counts[1]), uint64(counts[2])
    for _ in range(max_steps):  # a bound only: every lane is done after its tree's depth
        if n_plain + n_zero + n_cat == 0:
            break
        dst = 1 - src
        k_plain = k_zero = k_cat = uint64(0)
        for kind in range(3):
            n = n_plain if kind == 0 else (n_zero if kind == 1 else n_cat)
            for i in range(n):
                lane = lanes[src, kind, i]
                nd = lane >> _U32
                owner = lane & _LOW32
                word = nodes[nd * _U4 + _U2]
                x = X[base[owner] + uint64(word & _FEATURE)]
                if kind == 0:
                    right = _right_plain(x, nd, word, slots)
                elif kind == 1:
                    right = _right_zero(x, nd, word, slots)
                else:
                    right = _right_cat(x, nd, nodes, cat_bits)
                child = uint64(nodes[nd * _U4 + _U3]) + uint64(right)
                child_class = (word >> (_CHILD_SHIFT + right + right)) & uint32(3)
                leaf[owner] = child
                lane = (child << _U32) | owner
                lanes[dst, 0, k_plain] = lane
                lanes[dst, 1, k_zero] = lane
                lanes[dst, 2, k_cat] = lane
                k_plain += uint64(child_class == CLASS_PLAIN)
                k_zero += uint64(child_class == CLASS_ZERO)
                k_cat += uint64(child_class == CLASS_CAT)
        n_plain, n_zero, n_cat = k_plain, k_zero, k_cat
        src = dst


@njit(cache=True, nogil=True)
def _add_lane(lanes, counts, node, owner, node_class):
    """Append a walk starting at ``node`` to the list of its class (leaves: nowhere)."""
    lane = (uint64(node) << _U32) | uint64(owner)
    for kind, wanted in enumerate((CLASS_PLAIN, CLASS_ZERO, CLASS_CAT)):
        lanes[0, kind, counts[kind]] = lane
        counts[kind] += node_class == wanted


@njit(cache=True, nogil=True)
def _finish(raw, out_kind, sigmoid, divisor):
    """Model output from a raw score, as ``GBDT::Predict``: average_output models divide
    by the tree count (``divisor``), but not for ``raw_score``; binary applies the sigmoid.
    """
    if out_kind == _OUT_RAW:
        return raw
    raw = raw / divisor
    if out_kind == _OUT_SIGMOID:
        return 1.0 / (1.0 + math.exp(-sigmoid * raw))
    return raw


@njit(cache=True, nogil=True)
def _score_one(x, nodes, slots, trees, cat_bits):
    """Raw score of one row: its trees are the lanes."""
    n_trees = trees.shape[0]
    lanes = np.empty((2, 3, n_trees), dtype=np.uint64)
    counts = np.zeros(3, dtype=np.int64)
    leaf = np.empty(n_trees, dtype=np.uint64)
    base = np.zeros(n_trees, dtype=np.uint64)
    max_steps = 0
    for t in range(n_trees):
        root = uint64(trees[t, 0])
        leaf[t] = root
        node_class = (nodes[root * _U4 + _U2] >> uint32(CLASS_SHIFT)) & uint32(3)
        _add_lane(lanes, counts, root, t, node_class)
        max_steps = max(max_steps, trees[t, 1])
    _walk(x, base, nodes, slots, cat_bits, lanes, counts, leaf, max_steps)
    acc = 0.0
    for t in range(n_trees):  # LightGBM's summation order, for bit-equal results
        acc += slots[leaf[t] * _U2]  # a leaf's slot holds its output
    return acc


@njit(_ROW_SIG, cache=True, nogil=True)
def _predict_row(x, nodes, slots, trees, cat_bits, out_kind, sigmoid, divisor):
    return _finish(_score_one(x, nodes, slots, trees, cat_bits), out_kind, sigmoid, divisor)


@njit(cache=True, nogil=True)
def _score_block(X, nf, start, stop, nodes, slots, trees, cat_bits, out):
    """Raw scores of rows [start, stop) (at most _BLOCK_ROWS), tree by tree."""
    nb = stop - start
    lanes = np.empty((2, 3, _BLOCK_ROWS), dtype=np.uint64)
    counts = np.zeros(3, dtype=np.int64)
    leaf = np.empty(_BLOCK_ROWS, dtype=np.uint64)
    base = np.empty(_BLOCK_ROWS, dtype=np.uint64)
    acc = np.zeros(_BLOCK_ROWS, dtype=np.float64)
    for r in range(nb):
        base[r] = uint64(start + r) * uint64(nf)
    for t in range(trees.shape[0]):
        root = uint64(trees[t, 0])
        node_class = (nodes[root * _U4 + _U2] >> uint32(CLASS_SHIFT)) & uint32(3)
        if node_class == CLASS_LEAF:  # a single-leaf tree
            for r in range(nb):
                acc[r] += slots[root * _U2]
            continue
        kind = 0 if node_class == CLASS_PLAIN else (1 if node_class == CLASS_ZERO else 2)
        counts[:] = 0
        counts[kind] = nb
        lane = root << _U32
        for r in range(nb):
            lanes[0, kind, r] = lane | uint64(r)
        _walk(X, base, nodes, slots, cat_bits, lanes, counts, leaf, trees[t, 1])
        for r in range(nb):
            acc[r] += slots[leaf[r] * _U2]
    for r in range(nb):
        out[start + r] = acc[r]


@njit(cache=True, nogil=True)
def _score_range(X, nf, start, stop, nodes, slots, trees, cat_bits, out_kind, sig, div, out):
    if stop - start < _SMALL_BLOCK_ROWS:  # too few rows to overlap: use the trees
        for i in range(start, stop):
            out[i] = _score_one(X[i * nf : (i + 1) * nf], nodes, slots, trees, cat_bits)
    else:
        _score_block(X, nf, start, stop, nodes, slots, trees, cat_bits, out)
    for i in range(start, stop):
        out[i] = _finish(out[i], out_kind, sig, div)


@njit(_BATCH_SIG, cache=True, nogil=True)
def _score_serial(X, nf, nodes, slots, trees, cat_bits, out_kind, sig, div, out):
    n = X.shape[0] // nf
    for b in range((n + _BLOCK_ROWS - 1) // _BLOCK_ROWS):
        start = b * _BLOCK_ROWS
        stop = min(start + _BLOCK_ROWS, n)
        _score_range(X, nf, start, stop, nodes, slots, trees, cat_bits, out_kind, sig, div, out)


@njit(_BATCH_SIG, cache=True, nogil=True, parallel=True)
def _score_parallel(X, nf, nodes, slots, trees, cat_bits, out_kind, sig, div, out):
    n = X.shape[0] // nf
    for b in prange((n + _BLOCK_ROWS - 1) // _BLOCK_ROWS):
        start = b * _BLOCK_ROWS
        stop = min(start + _BLOCK_ROWS, n)
        _score_range(X, nf, start, stop, nodes, slots, trees, cat_bits, out_kind, sig, div, out)


@njit(f"float64(float64[::1], {_MODEL}, float64[::1], float64[::1])", cache=True, nogil=True)
def _contributions_row(x, nodes, slots, trees, cat_bits, values, out):
    """Saabas attribution of one row into ``out`` (num_feature + 1, last = base value).

    Returns the raw score: the leaves reached, summed in tree order as LightGBM does, so
    it is bit-equal to :func:`_score_one`.
    """
    base = out.shape[0] - 1
    out[:] = 0.0
    raw = 0.0
    for t in range(trees.shape[0]):
        nd = uint64(trees[t, 0])
        out[base] += values[nd]
        while True:
            word = nodes[nd * _U4 + _U2]
            node_class = (word >> uint32(CLASS_SHIFT)) & uint32(3)
            if node_class == CLASS_LEAF:
                break
            feature = word & _FEATURE
            x_f = x[feature]
            if node_class == CLASS_PLAIN:
                right = _right_plain(x_f, nd, word, slots)
            elif node_class == CLASS_ZERO:
                right = _right_zero(x_f, nd, word, slots)
            else:
                right = _right_cat(x_f, nd, nodes, cat_bits)
            child = uint64(nodes[nd * _U4 + _U3]) + uint64(right)
            out[feature] += values[child] - values[nd]
            nd = child
        raw += slots[nd * _U2]
    return raw


@njit(
    f"float64(float64[::1], {_MODEL}, float64[::1], int64, float64, float64, float64[::1],"
    " int64, int64[::1], float64[::1])",
    cache=True,
    nogil=True,
)
def _predict_row_reasons(
    x,
    nodes,
    slots,
    trees,
    cat_bits,
    values,
    out_kind,
    sigmoid,
    divisor,
    contrib,
    k,
    top_index,
    top_value,
):
    """Prediction of one row plus its ``k`` largest positive contributions, in one call.

    ``top_index``/``top_value`` receive the reasons, largest first (ties: lower feature
    index); unused entries get index -1. ``contrib`` is scratch (num_feature + 1).
    """
    # One walk per tree gives both the leaf (raw score) and the Saabas credits.
    raw = _contributions_row(x, nodes, slots, trees, cat_bits, values, contrib)
    n_features = contrib.shape[0] - 1
    for r in range(k):
        best, best_value = -1, 0.0
        for j in range(n_features):
            if contrib[j] > best_value:
                taken = False
                for q in range(r):
                    if top_index[q] == j:
                        taken = True
                if not taken:
                    best, best_value = j, contrib[j]
        top_index[r] = best
        top_value[r] = best_value
    return _finish(raw, out_kind, sigmoid, divisor)


# ----------------------------------------------------------------------------- wrapper
class Forest:
    """A LightGBM model compiled to flat arrays; the API mirrors ``lightgbm.Booster``.

    Inputs are float64 rows in the model's column order, categorical columns holding
    the integer codes the model was trained on (like ``Booster.predict`` on a numpy
    array: a ``pandas_categorical`` mapping in the model file is not applied). A Forest
    is immutable and its kernels release the GIL, so threads may share one.
    """

    def __init__(self, arrays: ForestArrays) -> None:
        """Wrap (and check) kernel arrays; use the ``from_*`` / ``load`` constructors."""
        check_arrays(arrays)
        self._arrays = arrays
        self._num_feature = arrays.num_feature
        self._row_shape = (arrays.num_feature,)
        nodes = np.ascontiguousarray(arrays.nodes).reshape(-1)
        self._model_args = (
            nodes,
            nodes.view(np.float64),
            np.ascontiguousarray(arrays.trees),
            np.ascontiguousarray(arrays.cat_bits),
        )
        self._node_values = np.ascontiguousarray(arrays.node_values)
        n_trees = arrays.trees.shape[0]
        self._divisor = float(n_trees) if arrays.average_output and n_trees else 1.0
        self._out_kind = _OUT_SIGMOID if arrays.objective == OBJECTIVE_SIGMOID else _OUT_IDENTITY
        self._sigmoid = float(arrays.sigmoid)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_model_string(cls, text: str) -> Forest:
        """Compile a model from LightGBM's text format (``Booster.model_to_string()``)."""
        return cls(build_arrays(parse_model_text(text)))

    @classmethod
    def from_model_file(cls, path: str | os.PathLike[str]) -> Forest:
        """Compile a LightGBM ``model.txt``."""
        return cls.from_model_string(Path(path).read_text(encoding="utf-8"))

    @classmethod
    def from_booster(cls, booster: Any) -> Forest:
        """Compile a trained ``lightgbm.Booster`` (through its text dump, never pickle)."""
        to_string = getattr(booster, "model_to_string", None)
        if to_string is None:
            raise TypeError(f"expected a lightgbm.Booster, got {type(booster).__name__}")
        return cls.from_model_string(to_string())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Forest:
        """Load a forest written by :meth:`save` (no pickle; the arrays are re-checked)."""
        return cls(load_arrays(path))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write an ``.npz``, byte-identical for the same model (written, then renamed)."""
        save_arrays(self._arrays, path)

    # ------------------------------------------------------------------ attributes
    def num_feature(self) -> int:
        """Number of input columns the model expects."""
        return self._num_feature

    def num_trees(self) -> int:
        """Number of trees."""
        return int(self._arrays.trees.shape[0])

    def feature_name(self) -> list[str]:
        """Input column names, in column order."""
        return list(self._arrays.feature_names)

    def expected_value(self) -> float:
        """Base value of :meth:`contributions_row`: mean raw score of the training rows."""
        total = 0.0
        for value in self._node_values[self._arrays.trees[:, 0]].tolist():
            total += value  # in tree order, as the kernel adds them
        return total

    # ------------------------------------------------------------------ prediction
    def predict(
        self, X: Any, *, raw_score: bool = False, num_threads: int | None = None
    ) -> np.ndarray:
        """Scores of a 2-D batch, shape (n,): probabilities, or raw margins if ``raw_score``.

        ``num_threads``: None or 0 = all Numba threads for batches of at least
        ``PARALLEL_MIN_ROWS`` rows; 1 = the calling thread only; k = at most k threads.
        """
        X = self._as_matrix(X)
        out = np.empty(X.shape[0], dtype=np.float64)
        kind = _OUT_RAW if raw_score else self._out_kind
        args = (X.reshape(-1), self._num_feature, *self._model_args)
        tail = (kind, self._sigmoid, self._divisor, out)
        threads = _resolve_threads(num_threads)
        if threads == 1 or X.shape[0] < PARALLEL_MIN_ROWS:
            _score_serial(*args, *tail)
            return out
        previous = numba.get_num_threads()
        numba.set_num_threads(threads)
        try:
            _score_parallel(*args, *tail)
        finally:
            numba.set_num_threads(previous)
        return out

    def predict_row(self, x: np.ndarray) -> float:
        """Score of one row (1-D float64, num_feature values): probability for binary."""
        if not (type(x) is np.ndarray and x.dtype is _F64 and x.shape == self._row_shape):
            x = self._as_row(x)
        elif x.strides != _ROW_STRIDES:
            x = np.ascontiguousarray(x)
        return _predict_row(x, *self._model_args, self._out_kind, self._sigmoid, self._divisor)

    def predict_raw_row(self, x: np.ndarray) -> float:
        """Raw score (margin) of one row."""
        if not (type(x) is np.ndarray and x.dtype is _F64 and x.shape == self._row_shape):
            x = self._as_row(x)
        elif x.strides != _ROW_STRIDES:
            x = np.ascontiguousarray(x)
        return _predict_row(x, *self._model_args, _OUT_RAW, self._sigmoid, self._divisor)

    def contributions_row(self, x: np.ndarray) -> np.ndarray:
        """Per-feature Saabas contributions to the raw score of one row.

        Shape (num_feature + 1,) like ``Booster.predict(..., pred_contrib=True)``: the last
        entry is :meth:`expected_value`, and the entries add up to :meth:`predict_raw_row`.
        """
        x = self._as_row(x)
        out = np.empty(self._num_feature + 1, dtype=np.float64)
        _contributions_row(x, *self._model_args, self._node_values, out)
        return out

    def top_reasons(self, x: np.ndarray, k: int) -> list[tuple[int, float]]:
        """The ``k`` features pushing this row's score up the most: (index, contribution).

        Sorted by contribution, largest first (ties by feature index); features with a
        contribution <= 0 are left out, so the list can be shorter than ``k``.
        """
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        contrib = self.contributions_row(x)[:-1]
        order = np.argsort(-contrib, kind="stable")[:k]
        return [(int(j), float(contrib[j])) for j in order if contrib[j] > 0.0]

    def predict_row_reasons(
        self,
        x: np.ndarray,
        k: int,
        top_index: np.ndarray,
        top_value: np.ndarray,
        scratch: np.ndarray,
    ) -> float:
        """:meth:`predict_row` and :meth:`top_reasons` of one row in a single kernel call.

        For the serving hot path: ``x`` must be a C-contiguous float64 row, ``top_index``
        (int64) and ``top_value`` (float64) hold at least ``k`` entries and receive the
        reasons (index -1 past the last one), ``scratch`` is float64 of num_feature + 1.
        """
        return _predict_row_reasons(
            x,
            *self._model_args,
            self._node_values,
            self._out_kind,
            self._sigmoid,
            self._divisor,
            scratch,
            k,
            top_index,
            top_value,
        )

    def warmup(self) -> None:
        """Run every kernel once (compiles them or loads them from Numba's cache)."""
        row = np.zeros(self._num_feature, dtype=np.float64)
        self.predict_row(row)
        self.contributions_row(row)
        self.predict_row_reasons(
            row, 1, np.empty(1, np.int64), np.empty(1), np.empty(self._num_feature + 1)
        )
        batch = np.zeros((PARALLEL_MIN_ROWS, self._num_feature), dtype=np.float64)
        self.predict(batch[:1], num_threads=1)
        self.predict(batch)

    # ------------------------------------------------------------------ input checks
    def _as_matrix(self, X: Any) -> np.ndarray:
        X = _as_float64(X, "X")
        if X.ndim != 2 or X.shape[1] != self._num_feature:
            raise ValueError(
                f"X must be 2-D with {self._num_feature} columns (one per model feature), "
                f"got shape {X.shape}"
            )
        X = np.ascontiguousarray(X)
        return X if X.flags.writeable else X.copy()  # the kernels take writable arrays

    def _as_row(self, x: Any) -> np.ndarray:
        x = _as_float64(x, "x")
        if x.ndim != 1 or x.shape[0] != self._num_feature:
            raise ValueError(
                f"x must be 1-D with {self._num_feature} values (one per model feature), "
                f"got shape {x.shape}"
            )
        return np.ascontiguousarray(x)


def _as_float64(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be numeric (float64), got dtype {array.dtype}")
    return array.astype(np.float64, copy=False)


def _resolve_threads(num_threads: int | None) -> int:
    available = numba.config.NUMBA_NUM_THREADS
    if num_threads is None or num_threads == 0:
        return available
    if num_threads < 0:
        raise ValueError(f"num_threads must be None or >= 0, got {num_threads}")
    return min(int(num_threads), available)
