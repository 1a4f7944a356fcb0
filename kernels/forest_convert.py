"""Parse a LightGBM text model and lay it out as flat arrays for the forest kernels.

Two stages, one public verb each: :func:`parse_model_text` turns ``model.txt`` into
:class:`TextModel` (a faithful transcription of the file), and :func:`build_arrays`
turns that into :class:`ForestArrays`, the layout the Numba kernels walk.

Layout (all trees concatenated, each tree breadth-first, root first). A node is one
16-byte record, ``nodes`` uint32 (n_nodes, 4), read through a float64 view for slot 0:

* words 0-1: float64 threshold (numerical split), float64 output (leaf), or for a
  categorical split two uint32: first word of its bitset in ``cat_bits`` and length;
* word 2: split feature (bits 0-23); the node's class (bits 24-25), its left child's
  class (26-27), its right child's class (28-29); FLAG_MISSING_RIGHT (bit 30);
* word 3: left child (absolute index; the right child is always left + 1; a leaf
  points at itself).

Classes: CLASS_PLAIN (numerical split), CLASS_LEAF, CLASS_ZERO (numerical split with
missing_type Zero whose zero band needs its own test), CLASS_CAT (categorical). The
kernels sort walks by the class of the node they stand on, and stop at leaves.
``node_values`` holds every node's expected value (row-count-weighted mean leaf
output, as in LightGBM's TreeSHAP); ``trees`` int32 (n_trees, 2) holds each tree's
root and depth (steps to its deepest leaf).

Missing values follow ``Tree::NumericalDecision`` in LightGBM's ``tree.h``: NaN
becomes 0.0 unless missing_type is NaN; missing_type Zero sends ``|x| <= kZeroThreshold``
(and so NaN) the default way; missing_type NaN sends NaN the default way; everything
else goes left iff ``x <= threshold``. So each numerical node has one "missing"
direction, stored as FLAG_MISSING_RIGHT. LightGBM's predictor also turns inputs with
``|x| <= kZeroThreshold`` into exact zeros; thresholds inside that band are moved to
its edge so the kernel can compare the raw input and still agree.
"""

from __future__ import annotations

import math
import os
import tempfile
import zipfile
from collections import deque
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import IO

import numpy as np

K_ZERO_THRESHOLD = float(np.float32(1e-35))  # LightGBM's kZeroThreshold (a float literal)

CLASS_PLAIN, CLASS_LEAF, CLASS_ZERO, CLASS_CAT = 0, 1, 2, 3
FEATURE_MASK = (1 << 24) - 1
CLASS_SHIFT = 24  # own class; the left / right child's class at +2 / +4
FLAG_MISSING_RIGHT = 1 << 30  # numerical splits: where missing values go

FORMAT_VERSION = 2  # of the .npz written by save_arrays
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed zip timestamps: byte-identical files

OBJECTIVE_IDENTITY = 0
OBJECTIVE_SIGMOID = 1

_CATEGORICAL_MASK = 1  # LightGBM decision_type bits
_DEFAULT_LEFT_MASK = 2
_MISSING_NONE, _MISSING_ZERO, _MISSING_NAN = 0, 1, 2


class UnsupportedModelError(ValueError):
    """The model is valid LightGBM but uses something the forest kernel cannot run."""


@dataclass(frozen=True, slots=True)
class TextTree:
    """One ``Tree=`` block of a LightGBM text model (LightGBM's own node numbering)."""

    num_leaves: int
    split_feature: np.ndarray  # int, internal nodes
    threshold: np.ndarray  # float64
    decision_type: np.ndarray  # int
    left_child: np.ndarray  # int; negative = ~leaf index
    right_child: np.ndarray
    leaf_value: np.ndarray  # float64, shrinkage already applied
    leaf_count: np.ndarray  # int
    internal_value: np.ndarray  # float64 (printed with ~6 significant digits)
    internal_count: np.ndarray  # int
    cat_boundaries: np.ndarray  # int
    cat_threshold: np.ndarray  # uint32


@dataclass(frozen=True, slots=True)
class TextModel:
    """The parts of a LightGBM text model that prediction depends on."""

    num_feature: int
    feature_names: list[str]
    objective: str  # e.g. "binary sigmoid:1"
    average_output: bool
    trees: list[TextTree]


@dataclass(frozen=True, slots=True)
class ForestArrays:
    """A forest in kernel layout (see the module docstring); plus output transform."""

    nodes: np.ndarray
    node_values: np.ndarray
    trees: np.ndarray
    cat_bits: np.ndarray
    num_feature: int
    feature_names: list[str]
    objective: int  # OBJECTIVE_*
    sigmoid: float  # scale of the sigmoid (binary) or 0.0
    average_output: bool


def parse_model_text(text: str) -> TextModel:
    """Parse LightGBM's native text format (``Booster.model_to_string()``)."""
    lines = text.splitlines()
    header: dict[str, str] = {}
    flags: set[str] = set()
    i = 0
    while i < len(lines) and not lines[i].startswith("Tree="):
        key, sep, value = lines[i].strip().partition("=")
        if sep:
            header[key] = value
        elif key:
            flags.add(key)
        i += 1
    if "tree" not in flags or "max_feature_idx" not in header:
        raise ValueError("not a LightGBM text model (no 'tree' header / max_feature_idx)")
    _check_header(header)
    trees: list[TextTree] = []
    while i < len(lines) and lines[i].startswith("Tree="):
        block: dict[str, str] = {}
        i += 1
        while i < len(lines) and lines[i].strip():
            key, _, value = lines[i].partition("=")
            block[key.strip()] = value.strip()
            i += 1
        while i < len(lines) and not lines[i].strip():
            i += 1
        trees.append(_parse_tree(block, len(trees)))
    if i >= len(lines) or lines[i].strip() != "end of trees":
        raise ValueError("LightGBM model text is truncated (no 'end of trees' line)")
    num_feature = int(header["max_feature_idx"]) + 1
    names = header.get("feature_names", "").split()
    if len(names) != num_feature:
        names = [f"Column_{j}" for j in range(num_feature)]
    return TextModel(num_feature, names, header["objective"], "average_output" in flags, trees)


def _check_header(header: dict[str, str]) -> None:
    for key in ("num_class", "num_tree_per_iteration"):
        if int(header.get(key, "1")) != 1:
            raise UnsupportedModelError(
                f"{key}={header[key]}: only single-output models (binary or regression) "
                "are supported, not multiclass"
            )
    if "objective" not in header:
        raise UnsupportedModelError("model has no objective line (custom objective?)")


def _ints(block: dict[str, str], key: str) -> np.ndarray:
    return np.array(block.get(key, "").split(), dtype=np.int64)


def _floats(block: dict[str, str], key: str) -> np.ndarray:
    return np.array([float(v) for v in block.get(key, "").split()], dtype=np.float64)


def _parse_tree(block: dict[str, str], index: int) -> TextTree:
    if block.get("is_linear", "0") != "0":
        raise UnsupportedModelError(f"tree {index} is a linear tree (linear_tree=True)")
    try:
        num_leaves = int(block["num_leaves"])
        tree = TextTree(
            num_leaves=num_leaves,
            split_feature=_ints(block, "split_feature"),
            threshold=_floats(block, "threshold"),
            decision_type=_ints(block, "decision_type"),
            left_child=_ints(block, "left_child"),
            right_child=_ints(block, "right_child"),
            leaf_value=_floats(block, "leaf_value"),
            leaf_count=_ints(block, "leaf_count"),
            internal_value=_floats(block, "internal_value"),
            internal_count=_ints(block, "internal_count"),
            cat_boundaries=_ints(block, "cat_boundaries"),
            cat_threshold=_ints(block, "cat_threshold").astype(np.uint32),
        )
    except (KeyError, ValueError) as exc:
        raise ValueError(f"tree {index}: malformed field ({exc})") from exc
    n_int = num_leaves - 1
    sizes = {
        "split_feature": tree.split_feature.size,
        "threshold": tree.threshold.size,
        "decision_type": tree.decision_type.size,
        "left_child": tree.left_child.size,
        "right_child": tree.right_child.size,
    }
    bad = {k: n for k, n in sizes.items() if n != n_int}
    if num_leaves < 1 or bad or tree.leaf_value.size != num_leaves:
        raise ValueError(f"tree {index}: num_leaves={num_leaves} but field sizes {bad}")
    return tree


def build_arrays(model: TextModel) -> ForestArrays:
    """Lay out a parsed model for the kernels (see the module docstring)."""
    objective, sigmoid = _objective(model.objective)
    if model.num_feature > FEATURE_MASK + 1:
        raise UnsupportedModelError(f"{model.num_feature} features: at most 2**24 supported")
    builder = _NodeBuilder()
    trees = np.zeros((len(model.trees), 2), dtype=np.int32)
    for t, tree in enumerate(model.trees):
        _check_tree(tree, t, model.num_feature)
        trees[t] = (len(builder.slots), builder.add_tree(tree, t))
    nodes, node_values = builder.finish()
    return ForestArrays(
        nodes=nodes,
        node_values=node_values,
        trees=trees,
        cat_bits=np.array(builder.cat_bits or [0], dtype=np.uint32),
        num_feature=model.num_feature,
        feature_names=list(model.feature_names),
        objective=objective,
        sigmoid=sigmoid,
        average_output=model.average_output,
    )


def _objective(line: str) -> tuple[int, float]:
    name, *options = line.split()
    if name == "binary":
        sigmoid = 1.0
        for option in options:
            key, _, value = option.partition(":")
            if key == "sigmoid":
                sigmoid = float(value)
        if not (math.isfinite(sigmoid) and sigmoid > 0):
            raise ValueError(f"objective {line!r}: sigmoid must be a positive number")
        return OBJECTIVE_SIGMOID, sigmoid
    if name == "regression" and "sqrt" not in options:
        return OBJECTIVE_IDENTITY, 0.0
    raise UnsupportedModelError(
        f"objective {line!r} is not supported (binary or plain regression only)"
    )


def _check_tree(tree: TextTree, index: int, num_feature: int) -> None:
    n_int = tree.num_leaves - 1
    if n_int == 0:
        return
    children = np.concatenate([tree.left_child, tree.right_child])
    internal = children[children >= 0]
    leaves = ~children[children < 0]
    parents = np.concatenate([np.arange(n_int), np.arange(n_int)])
    ok = (
        internal.size == n_int - 1
        and np.array_equal(np.sort(internal), np.arange(1, n_int))
        and np.all(internal > parents[children >= 0])  # LightGBM numbers parents first
        and np.array_equal(np.sort(leaves), np.arange(tree.num_leaves))
        and tree.split_feature.min() >= 0
        and tree.split_feature.max() < num_feature
    )
    if not ok:
        raise ValueError(f"tree {index}: children or split features do not form a valid tree")
    is_cat = (tree.decision_type & _CATEGORICAL_MASK) > 0
    n_cat = tree.cat_boundaries.size - 1
    if is_cat.any():
        cat_idx = tree.threshold[is_cat]
        bounds = tree.cat_boundaries
        if (
            n_cat < 1
            or np.any(cat_idx != np.floor(cat_idx))
            or cat_idx.min() < 0
            or cat_idx.max() >= n_cat
            or bounds[0] != 0
            or np.any(np.diff(bounds) < 0)
            or bounds[-1] != tree.cat_threshold.size
        ):
            raise ValueError(f"tree {index}: inconsistent categorical split tables")
    if np.any(((tree.decision_type >> 2) & 3) > _MISSING_NAN):
        raise ValueError(f"tree {index}: unknown missing type in decision_type")


def _expected_values(tree: TextTree) -> tuple[np.ndarray, np.ndarray]:
    """Row-count-weighted mean leaf value under every (internal node, leaf)."""
    leaf_vals = tree.leaf_value.copy()
    n_int = tree.num_leaves - 1
    internal = tree.internal_value.copy() if tree.internal_value.size == n_int else np.zeros(n_int)
    counts = tree.leaf_count.astype(np.float64)
    if counts.size != tree.num_leaves:
        counts = np.ones(tree.num_leaves)
    node_counts = np.zeros(n_int)

    def value_count(child: int) -> tuple[float, float]:
        if child < 0:
            return leaf_vals[~child], counts[~child]
        return internal[child], node_counts[child]

    # LightGBM numbers a node before its children, so a reverse sweep is bottom-up.
    for node in range(n_int - 1, -1, -1):
        lv, lc = value_count(int(tree.left_child[node]))
        rv, rc = value_count(int(tree.right_child[node]))
        node_counts[node] = lc + rc
        if lc + rc > 0:
            internal[node] = (lv * lc + rv * rc) / (lc + rc)
    return internal, leaf_vals


def _numerical_split(threshold: float, decision_type: int) -> tuple[float, int, bool]:
    """Kernel threshold, class and "missing goes right" of one numerical split."""
    missing = (decision_type >> 2) & 3
    default_left = (decision_type & _DEFAULT_LEFT_MASK) > 0
    thr = threshold
    if missing != _MISSING_ZERO and -K_ZERO_THRESHOLD <= thr < K_ZERO_THRESHOLD:
        # The predictor feeds |x| <= kZero in as 0.0: move thr to the band's edge.
        thr = K_ZERO_THRESHOLD if thr >= 0.0 else math.nextafter(-K_ZERO_THRESHOLD, -math.inf)
    # NaN is read as 0.0 unless missing_type is NaN.
    missing_left = thr >= 0.0 if missing == _MISSING_NONE else default_left
    node_class = CLASS_PLAIN
    if missing == _MISSING_ZERO:
        # The zero band needs its own test unless the comparison already sends it the
        # default way (NaN goes the missing way in every class).
        band_left = thr >= K_ZERO_THRESHOLD
        band_right = thr < -K_ZERO_THRESHOLD
        if not ((default_left and band_left) or (not default_left and band_right)):
            node_class = CLASS_ZERO
    return thr, node_class, not missing_left


class _NodeBuilder:
    """Collects node records tree by tree, breadth-first."""

    def __init__(self) -> None:
        self.slots: list[int] = []  # words 0-1 as one uint64 (bits of a float64 or a pair)
        self.words: list[tuple[int, int]] = []  # (feature | class/flag bits, left child)
        self.values: list[float] = []
        self.cat_bits: list[int] = []

    def add_tree(self, tree: TextTree, index: int) -> int:
        """Append one tree; return its depth."""
        bitsets = []  # (first word, word count) of each of this tree's bitsets
        for k in range(max(tree.cat_boundaries.size - 1, 0)):
            lo, hi = int(tree.cat_boundaries[k]), int(tree.cat_boundaries[k + 1])
            words = tree.cat_threshold[lo:hi].tolist() or [0]
            bitsets.append((len(self.cat_bits), len(words)))
            self.cat_bits.extend(words)
        internal_vals, leaf_vals = _expected_values(tree)
        queue: deque[tuple[int, int]] = deque([(0 if tree.num_leaves > 1 else -1, 0)])
        depth = 0
        while queue:
            lgb_node, d = queue.popleft()
            index = len(self.slots)
            if lgb_node < 0:  # leaf ~lgb_node
                self._add(_f64_bits(leaf_vals[~lgb_node]), 0, CLASS_LEAF, False, index)
                self.values.append(float(leaf_vals[~lgb_node]))
                depth = max(depth, d)
                continue
            left = index + len(queue) + 1  # breadth-first: children after the queue
            feature = int(tree.split_feature[lgb_node])
            dtype = int(tree.decision_type[lgb_node])
            if dtype & _CATEGORICAL_MASK:
                start, n_words = bitsets[int(tree.threshold[lgb_node])]
                self._add(start | (n_words << 32), feature, CLASS_CAT, False, left)
            else:
                thr, node_class, right = _numerical_split(float(tree.threshold[lgb_node]), dtype)
                self._add(_f64_bits(thr), feature, node_class, right, left)
            self.values.append(float(internal_vals[lgb_node]))
            queue.append((int(tree.left_child[lgb_node]), d + 1))
            queue.append((int(tree.right_child[lgb_node]), d + 1))
        return depth

    def _add(self, slot: int, feature: int, node_class: int, right: bool, left: int) -> None:
        word = feature | (node_class << CLASS_SHIFT) | (FLAG_MISSING_RIGHT if right else 0)
        self.slots.append(slot)
        self.words.append((word, left))

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """(nodes, node_values) arrays, with every node's child classes filled in."""
        nodes = np.zeros((len(self.slots), 4), dtype=np.uint32)
        nodes[:, :2] = np.array(self.slots, dtype=np.uint64).view(np.uint32).reshape(-1, 2)
        nodes[:, 2:] = np.array(self.words, dtype=np.uint32).reshape(-1, 2)
        return _with_child_classes(nodes), np.array(self.values, dtype=np.float64)


def _f64_bits(value: float) -> int:
    return int(np.float64(value).view(np.uint64))


def _node_classes(nodes: np.ndarray) -> np.ndarray:
    return (nodes[:, 2] >> CLASS_SHIFT) & 3


def _with_child_classes(nodes: np.ndarray) -> np.ndarray:
    """Set each node's child-class bits (a leaf's children are itself)."""
    classes = _node_classes(nodes)
    left = nodes[:, 3].astype(np.int64)
    right = np.where(classes == CLASS_LEAF, left, left + 1)
    right = np.minimum(right, len(nodes) - 1)
    child_bits = (classes[left] << (CLASS_SHIFT + 2)) | (classes[right] << (CLASS_SHIFT + 4))
    nodes[:, 2] = (nodes[:, 2] & ~np.uint32(0xF << (CLASS_SHIFT + 2))) | child_bits
    return nodes


def check_arrays(arrays: ForestArrays) -> None:
    """Refuse arrays the kernels could misread or walk out of bounds on (corrupt file)."""
    nodes, trees, bits = arrays.nodes, arrays.trees, arrays.cat_bits
    n = nodes.shape[0] if nodes.ndim == 2 else -1
    if (
        nodes.dtype != np.uint32
        or nodes.ndim != 2
        or nodes.shape[1] != 4
        or trees.dtype != np.int32
        or trees.ndim != 2
        or trees.shape[1] != 2
        or arrays.node_values.dtype != np.float64
        or arrays.node_values.shape != (n,)
        or bits.dtype != np.uint32
        or bits.ndim != 1
        or bits.size < 1
        or arrays.num_feature < 1
        or len(arrays.feature_names) != arrays.num_feature
    ):
        raise ValueError("forest arrays have the wrong dtypes or shapes")
    roots = trees[:, 0].astype(np.int64)
    if roots.size and (roots[0] != 0 or np.any(np.diff(roots) <= 0) or roots[-1] >= n):
        raise ValueError("forest arrays: tree roots must start at 0 and increase")
    if roots.size == 0 and n != 0:
        raise ValueError("forest arrays: nodes without trees")
    index = np.arange(n)
    tree_end = np.append(roots[1:], n)[np.searchsorted(roots, index, side="right") - 1]
    classes = _node_classes(nodes)
    leaf, cat = classes == CLASS_LEAF, classes == CLASS_CAT
    left = nodes[:, 3].astype(np.int64)
    start, n_words = nodes[:, 0].astype(np.int64), nodes[:, 1].astype(np.int64)
    ok = (
        np.all(np.where(leaf, left == index, (left > index) & (left + 1 < tree_end)))
        and np.all(leaf | ((nodes[:, 2] & FEATURE_MASK) < arrays.num_feature))
        and np.all(~cat | ((n_words >= 1) & (start + n_words <= bits.size)))
        and np.all(nodes[:, 2] >> 31 == 0)
    )
    if ok and n:  # the child classes must be right, or walks would stop early or late
        ok = np.array_equal(_with_child_classes(nodes.copy())[:, 2], nodes[:, 2])
    if not ok:
        raise ValueError("forest arrays do not describe valid trees")
    # Children come after their parent inside the same tree, so one forward sweep
    # finds the longest walk to every node; each tree's depth must cover it.
    depth = np.zeros(n, dtype=np.int64)
    for i in np.flatnonzero(~leaf):
        d = depth[i] + 1
        depth[left[i]] = max(depth[left[i]], d)
        depth[left[i] + 1] = max(depth[left[i] + 1], d)
    longest = np.maximum.reduceat(depth, roots) if n else np.zeros(0, dtype=np.int64)
    if np.any(longest > trees[:, 1]):
        raise ValueError("forest arrays: a tree is deeper than its recorded depth")


def save_arrays(arrays: ForestArrays, path: str | os.PathLike[str]) -> None:
    """Write an ``.npz`` (no pickle), byte-identical for equal arrays, by atomic rename."""
    fields = {
        "format_version": np.int64(FORMAT_VERSION),
        "nodes": arrays.nodes,
        "node_values": arrays.node_values,
        "trees": arrays.trees,
        "cat_bits": arrays.cat_bits,
        "num_feature": np.int64(arrays.num_feature),
        "feature_names": np.array(arrays.feature_names, dtype=np.str_),
        "objective": np.int64(arrays.objective),
        "sigmoid": np.float64(arrays.sigmoid),
        "average_output": np.bool_(arrays.average_output),
    }
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            _write_npz(fh, fields)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_arrays(path: str | os.PathLike[str]) -> ForestArrays:
    """Read an ``.npz`` written by :func:`save_arrays` (the caller checks the arrays)."""
    with np.load(path, allow_pickle=False) as data:
        fields = {key: data[key] for key in data.files}
    version = int(fields.get("format_version", -1))
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: forest format {version}, expected {FORMAT_VERSION}")
    try:
        return ForestArrays(
            nodes=fields["nodes"],
            node_values=fields["node_values"],
            trees=fields["trees"],
            cat_bits=fields["cat_bits"],
            num_feature=int(fields["num_feature"]),
            feature_names=[str(name) for name in fields["feature_names"]],
            objective=int(fields["objective"]),
            sigmoid=float(fields["sigmoid"]),
            average_output=bool(fields["average_output"]),
        )
    except KeyError as exc:
        raise ValueError(f"{path}: not a forest file (missing {exc})") from exc


def _write_npz(fh: IO[bytes], fields: dict[str, np.ndarray | np.generic]) -> None:
    """``np.savez`` layout with fixed zip metadata, so equal arrays give equal bytes."""
    with zipfile.ZipFile(fh, mode="w", compression=zipfile.ZIP_STORED) as zf:
        for key in sorted(fields):
            buffer = BytesIO()
            np.lib.format.write_array(buffer, np.asanyarray(fields[key]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_DATE)
            info.external_attr = 0o644 << 16
            info.create_system = 3  # unix, whatever machine writes it
            zf.writestr(info, buffer.getvalue())
