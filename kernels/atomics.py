"""Atomic operations, a spinlock and ring commits for Numba kernels over shared memory.

The card state table lives in shared memory and is updated by several worker
processes. Its writers take a spinlock held in the table's own header, *inside* the
kernel: the critical section never waits for a Python lock or the GIL, so a worker
that holds it cannot be stalled by another thread of its own process (a process-shared
``multiprocessing.Lock`` around a GIL-releasing kernel call convoys under load).

The lock word holds the owner's pid (0 = free), so the supervisor can break the lock of
a worker that died holding it (:func:`break_lock`).
"""

from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

_SPINS_BEFORE_YIELD = 64


def _element_pointer(context, builder, array_type, array_value, index):  # noqa: ANN001, ANN202
    array = context.make_array(array_type)(context, builder, array_value)
    return cgutils.get_item_pointer(context, builder, array_type, array, [index], wraparound=False)


@intrinsic
def compare_and_swap(typingctx, array, index, expected, new):  # noqa: ANN001, ANN201, ARG001
    """Atomically: ``old = array[index]; if old == expected: array[index] = new``; return old."""
    if not (isinstance(array, types.Array) and array.dtype == types.int64):
        return None
    signature = types.int64(array, index, types.int64, types.int64)

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        array_value, index_value, expected_value, new_value = args
        pointer = _element_pointer(context, builder, sig.args[0], array_value, index_value)
        pair = builder.cmpxchg(pointer, expected_value, new_value, "acq_rel", "acquire")
        return builder.extract_value(pair, 0)

    return signature, codegen


@intrinsic
def store_release(typingctx, array, index, value):  # noqa: ANN001, ANN201, ARG001
    """Atomically store ``value`` at ``array[index]`` with release ordering."""
    if not (isinstance(array, types.Array) and array.dtype == types.int64):
        return None
    signature = types.void(array, index, types.int64)

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        array_value, index_value, value = args
        pointer = _element_pointer(context, builder, sig.args[0], array_value, index_value)
        builder.atomic_rmw("xchg", pointer, value, "release")
        return context.get_dummy_value()

    return signature, codegen


@intrinsic
def load_acquire(typingctx, array, index):  # noqa: ANN001, ANN201, ARG001
    """Atomically load ``array[index]`` with acquire ordering (reads after it see what
    the writer stored before its release)."""
    if not (isinstance(array, types.Array) and array.dtype == types.int64):
        return None
    signature = types.int64(array, index)

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        array_value, index_value = args
        pointer = _element_pointer(context, builder, sig.args[0], array_value, index_value)
        return builder.load_atomic(pointer, "acquire", 8)

    return signature, codegen


@intrinsic
def yield_cpu(typingctx):  # noqa: ANN001, ANN201, ARG001
    """``sched_yield()``: let the lock holder run when it shares our core."""
    signature = types.int32()

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        function_type = ir.FunctionType(ir.IntType(32), [])
        function = cgutils.get_or_insert_function(builder.module, function_type, "sched_yield")
        return builder.call(function, [])

    return signature, codegen


@njit(cache=True, nogil=True)
def spin_lock(array, index, owner):  # noqa: ANN001, ANN201
    """Take the lock word ``array[index]`` for ``owner`` (a nonzero id, e.g. the pid)."""
    spins = 0
    while compare_and_swap(array, index, 0, owner) != 0:
        spins += 1
        if spins >= _SPINS_BEFORE_YIELD:
            yield_cpu()
            spins = 0


@njit(cache=True, nogil=True)
def spin_unlock(array, index):  # noqa: ANN001, ANN201
    """Release the lock word."""
    store_release(array, index, 0)


@njit(cache=True, nogil=True)
def break_lock(array, index, dead_owner):  # noqa: ANN001, ANN201
    """Free the lock if ``dead_owner`` holds it; True when it did."""
    return compare_and_swap(array, index, dead_owner, 0) == dead_owner


@njit(cache=True, nogil=True)
def publish_sequence(stamps, first_slot, first_value, count):  # noqa: ANN001, ANN201
    """Commit ``count`` ring slots from ``first_slot`` (wrapping): slot ``k`` gets stamp
    ``first_value + k`` with release ordering, after every store the caller made before."""
    capacity = stamps.shape[0]
    for k in range(count):
        store_release(stamps, (first_slot + k) % capacity, first_value + k)


@njit(cache=True, nogil=True)
def count_published(stamps, first_slot, first_value, limit):  # noqa: ANN001, ANN201
    """How many slots from ``first_slot`` (wrapping) carry their expected stamps
    ``first_value, first_value + 1, …`` (≤ ``limit``): the committed run a reader may take.
    Loads with acquire ordering, so the slots' data read after this call is complete."""
    capacity = stamps.shape[0]
    for k in range(limit):
        if load_acquire(stamps, (first_slot + k) % capacity) != first_value + k:
            return k
    return limit


@njit(cache=True, nogil=True)
def store_ordered(array, index, value):  # noqa: ANN001, ANN201
    """``array[index] = value`` with release ordering (after the caller's earlier reads
    and writes)."""
    store_release(array, index, value)
