"""The mirror ring: a worker's mirrored requests, in memory its shadow scorer can map.

    request threads ── put_one / put_rows ──▶ ring (shared memory) ──▶ take / release
    (producers, in the worker)                                     (one consumer: the
                                                                    scorer process, or
                                                                    the mirror thread)

The hot path writes a mirrored request straight into a preallocated slot: its numbers
and decision (one ``struct.pack_into``), its feature row (one copy) and its strings
(version, request id, transaction id, client: one copy into a byte heap). It then
commits the slot with a release store of the slot's stamp. Nothing else in the worker
touches the row again: no Python objects are kept, no thread batches or pickles it. The
consumer maps the same memory, takes the run of committed slots (acquire loads), builds
column arrays with numpy and frees the slots when it has scored them.

Layout (little-endian; ``capacity`` slots, ``heap_bytes`` of strings):

    header   int64[8]: [0] capacity, [1] features per row, [2] heap bytes,
                       [3] read sequence, [4] heap read position (both the consumer's)
    stamps   int64[capacity]: sequence + 1 once the slot is committed
    records  RECORD[capacity]
    features float64[capacity, features]
    heap     uint8[heap_bytes]: each row's strings, contiguous (wrapping to the start)

Sequences and heap positions only grow; slot = sequence % capacity, heap offset =
position % heap_bytes. The ring is full when ``capacity`` slots or ``heap_bytes`` of
strings are waiting: the producer then refuses the row (the caller counts the drop).
A slot reserved by a thread that dies before committing it stops the consumer there;
a producer's death loses at most the rows it was writing.
"""

from __future__ import annotations

import mmap
import os
import struct
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from riskwire.kernels.atomics import count_published, publish_sequence, store_ordered

from .compare import DECISION_CODES, DECISIONS

HEADER_WORDS = 8
READ_SEQUENCE, HEAP_READ = 3, 4
STRINGS = 4  # version, request id, transaction id, client
NO_TRACE, TRACED, PARENT_UNSAMPLED, PARENT_SAMPLED = 0, 1, 2, 3
RECORD = np.dtype(
    [
        ("time_ms", "<i8"),
        ("card_key", "<u8"),
        ("probability", "<f8"),
        ("latency_us", "<f8"),
        ("strings_at", "<i8"),  # heap position of the row's strings
        ("lengths", "<i4", (STRINGS,)),  # their UTF-8 lengths, in order
        ("decision", "<i1"),  # DECISION_CODES, -1 for anything else
        ("trace", "<i1"),  # NO_TRACE, TRACED or the caller's parent and its sampled flag
        ("trace_hi", "<u8"),
        ("trace_lo", "<u8"),
        ("span_id", "<u8"),
    ]
)
_PACK = struct.Struct("<qQddq4ibbQQQ")
assert _PACK.size == RECORD.itemsize
_MASK64 = (1 << 64) - 1
_DECISIONS = np.array([*DECISIONS, None], dtype=object)  # code -1 → None


@dataclass(slots=True)
class TakenRows:
    """Committed rows taken off the ring, as columns (the consumer's copies)."""

    count: int
    versions: list[str]
    request_ids: list[str]
    transaction_ids: list[str]
    clients: list[str | None]
    time_ms: np.ndarray
    card_keys: np.ndarray
    probabilities: np.ndarray
    decision_codes: np.ndarray  # DECISION_CODES, -1 for none of them
    decisions: np.ndarray  # decision names (object; None for code -1)
    latency_us: np.ndarray
    features: np.ndarray
    traces: list  # unique (trace id, span id, parent) of the traced calls, in order
    heap_end: int  # heap position after the last row's strings


def _trace_fields(trace: tuple | None) -> tuple[int, int, int, int]:
    if trace is None:
        return NO_TRACE, 0, 0, 0
    trace_id, span_id, parent = trace
    kind = TRACED if parent is None else (PARENT_SAMPLED if parent[2] else PARENT_UNSAMPLED)
    return kind, (trace_id >> 64) & _MASK64, trace_id & _MASK64, span_id & _MASK64


def _layout(capacity: int, num_features: int, heap_bytes: int) -> tuple[int, ...]:
    """Byte offsets of the stamps, records, features and heap, and the total size."""
    stamps_at = HEADER_WORDS * 8
    records_at = stamps_at + 8 * capacity
    features_at = records_at + RECORD.itemsize * capacity
    features_at += -features_at % 8  # float64 alignment
    heap_at = features_at + 8 * capacity * num_features
    return stamps_at, records_at, features_at, heap_at, heap_at + heap_bytes


def _anonymous_file(size: int) -> int:
    """A file descriptor of ``size`` zeroed bytes with no name (memfd where there is one)."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("riskwire-mirror-ring", os.MFD_CLOEXEC)
    else:  # pragma: no cover - not Linux
        with tempfile.TemporaryFile() as handle:
            fd = os.dup(handle.fileno())
    os.ftruncate(fd, size)
    return fd


class MirrorRing:
    """A bounded multi-producer, single-consumer ring of mirrored rows in shared memory.

    Create it in the worker (:meth:`create`); the consumer process opens the same memory
    from the descriptor (:meth:`attach`). Producers are the worker's threads; there is
    exactly one consumer at a time.
    """

    def __init__(self, fd: int, *, owner: bool) -> None:
        self.fd = fd
        self._owner = owner
        header = np.frombuffer(os.pread(fd, HEADER_WORDS * 8, 0), dtype="<i8")
        self.capacity, self.num_features, self.heap_bytes = (int(v) for v in header[:3])
        stamps_at, records_at, features_at, heap_at, size = _layout(
            self.capacity, self.num_features, self.heap_bytes
        )
        self._map = mmap.mmap(fd, size)
        buffer = self._map
        self._header = np.frombuffer(buffer, "<i8", HEADER_WORDS, 0)
        self._stamps = np.frombuffer(buffer, "<i8", self.capacity, stamps_at)
        self._records = np.frombuffer(buffer, RECORD, self.capacity, records_at)
        self._features = np.frombuffer(
            buffer, "<f8", self.capacity * self.num_features, features_at
        ).reshape(self.capacity, self.num_features)
        self._heap = memoryview(buffer)[heap_at : heap_at + self.heap_bytes]
        self._records_at = records_at
        # Producer side (the worker): reservations, under a lock; the consumer's
        # positions are re-read from the header only when the ring looks full.
        self._lock = threading.Lock()
        self._next = self._read = int(self._header[READ_SEQUENCE])
        self._heap_next = self._heap_read = int(self._header[HEAP_READ])
        publish_sequence(np.zeros(1, np.int64), 0, 0, 0)  # compiled before any request

    @classmethod
    def create(cls, capacity: int, num_features: int, heap_bytes: int | None = None) -> MirrorRing:
        """A new, empty ring (``heap_bytes`` default: 256 bytes of strings per slot)."""
        if capacity < 1 or num_features < 1:
            raise ValueError("a mirror ring needs at least one slot and one feature")
        heap_bytes = heap_bytes or 256 * capacity
        fd = _anonymous_file(_layout(capacity, num_features, heap_bytes)[-1])
        header = np.zeros(HEADER_WORDS, "<i8")
        header[:3] = capacity, num_features, heap_bytes
        os.pwrite(fd, header.tobytes(), 0)
        return cls(fd, owner=True)

    @classmethod
    def attach(cls, fd: int) -> MirrorRing:
        """The ring behind ``fd`` (inherited from the worker), to consume it."""
        return cls(fd, owner=False)

    def close(self) -> None:
        """Unmap (and close the descriptor if this side created it)."""
        self._heap.release()
        self._header = self._stamps = self._records = self._features = None  # type: ignore[assignment]
        self._map.close()
        if self._owner:
            os.close(self.fd)

    # ------------------------------------------------------------------ producers
    def pending(self) -> int:
        """Rows written and not yet released by the consumer."""
        return self._next - int(self._header[READ_SEQUENCE])

    def written(self) -> int:
        """The sequence number the next row will get (every row before it is written or
        being written)."""
        return self._next

    def _has_room(self, seq: int, rows: int, heap_end: int) -> bool:
        if seq + rows - self._read > self.capacity or heap_end - self._heap_read > self.heap_bytes:
            self._read = int(self._header[READ_SEQUENCE])
            self._heap_read = int(self._header[HEAP_READ])
            if seq + rows - self._read > self.capacity:
                return False
            if heap_end - self._heap_read > self.heap_bytes:
                return False
        return True

    def _heap_start(self, size: int) -> int:
        """Where ``size`` bytes of strings go: the next position, or the heap's start
        when they would wrap (the tail is skipped)."""
        position = self._heap_next
        offset = position % self.heap_bytes
        if offset + size > self.heap_bytes:
            position += self.heap_bytes - offset
        return position

    def put_one(
        self,
        version: str,
        request_id: str,
        transaction_id: str,
        client: str,
        time_ms: int,
        card_key: int,
        probability: float,
        decision: str,
        latency_us: float,
        features: np.ndarray,
        trace: tuple | None = None,
    ) -> bool:
        """Write and commit one row; False (nothing written) when the ring is full."""
        encoded = (version.encode(), request_id.encode(), transaction_id.encode(), client.encode())
        blob = b"".join(encoded)
        size = len(blob)
        kind, trace_hi, trace_lo, span_id = _trace_fields(trace)
        with self._lock:
            seq = self._next
            position = self._heap_start(size)
            if not self._has_room(seq, 1, position + size):
                return False
            slot = seq % self.capacity
            offset = position % self.heap_bytes
            self._heap[offset : offset + size] = blob
            _PACK.pack_into(
                self._map, self._records_at + slot * _PACK.size,
                time_ms, card_key, probability, latency_us, position,
                len(encoded[0]), len(encoded[1]), len(encoded[2]), len(encoded[3]),
                DECISION_CODES.get(decision, -1), kind, trace_hi, trace_lo, span_id,
            )  # fmt: skip
            self._features[slot] = features
            self._next = seq + 1
            self._heap_next = position + size
            publish_sequence(self._stamps, slot, seq + 1, 1)
        return True

    def put_rows(
        self,
        version: str,
        request_ids: Sequence[str],
        transaction_ids: Sequence[str],
        client: str,
        time_ms: np.ndarray,
        card_keys: np.ndarray,
        probabilities: np.ndarray,
        decisions: np.ndarray,
        latency_us: float,
        features: np.ndarray,
        trace: tuple | None = None,
    ) -> bool:
        """Write and commit the rows of one batch call, all or none (False: full)."""
        rows = len(request_ids)
        version_bytes, client_bytes = version.encode(), client.encode()
        encoded_ids = [r.encode() for r in request_ids]
        encoded_tids = [t.encode() for t in transaction_ids]
        lengths = np.empty((rows, STRINGS), np.int32)
        lengths[:, 0] = len(version_bytes)
        lengths[:, 1] = [len(b) for b in encoded_ids]
        lengths[:, 2] = [len(b) for b in encoded_tids]
        lengths[:, 3] = len(client_bytes)
        blob = b"".join(
            version_bytes + r + t + client_bytes
            for r, t in zip(encoded_ids, encoded_tids, strict=True)
        )
        size = len(blob)
        record = np.empty(rows, RECORD)
        record["time_ms"] = time_ms
        record["card_key"] = card_keys
        record["probability"] = probabilities
        record["latency_us"] = latency_us
        record["lengths"] = lengths
        record["decision"] = [DECISION_CODES.get(d, -1) for d in decisions]
        kind, trace_hi, trace_lo, span_id = _trace_fields(trace)
        record["trace"], record["trace_hi"] = kind, trace_hi
        record["trace_lo"], record["span_id"] = trace_lo, span_id
        offsets = np.zeros(rows, np.int64)
        np.cumsum(lengths.sum(axis=1)[:-1], out=offsets[1:])
        with self._lock:
            seq = self._next
            position = self._heap_start(size)
            if size > self.heap_bytes or not self._has_room(seq, rows, position + size):
                return False
            offset = position % self.heap_bytes
            self._heap[offset : offset + size] = blob
            record["strings_at"] = position + offsets
            slots = (seq + np.arange(rows)) % self.capacity
            self._records[slots] = record
            self._features[slots] = features
            self._next = seq + rows
            self._heap_next = position + size
            publish_sequence(self._stamps, seq % self.capacity, seq + 1, rows)
        return True

    # ------------------------------------------------------------------ consumer
    def committed(self, limit: int, upto: int | None = None) -> int:
        """How many rows from the read position are committed (≤ ``limit``, and before
        sequence ``upto`` when given)."""
        read = int(self._header[READ_SEQUENCE])
        if upto is not None:
            limit = min(limit, upto - read)
        if limit <= 0:
            return 0
        return count_published(self._stamps, read % self.capacity, read + 1, limit)

    def take(self, limit: int, upto: int | None = None) -> TakenRows | None:
        """Copies of up to ``limit`` committed rows from the read position (None: none);
        they stay in the ring until :meth:`release`."""
        count = self.committed(limit, upto)
        if not count:
            return None
        read = int(self._header[READ_SEQUENCE])
        slots = (read + np.arange(count)) % self.capacity
        record = self._records[slots]  # fancy indexing: copies
        features = self._features[slots]
        versions, request_ids, transaction_ids, clients = [], [], [], []
        heap, heap_bytes = self._heap, self.heap_bytes
        known_versions: dict[bytes, str] = {}
        for position, (v, r, t, c) in zip(
            (record["strings_at"] % heap_bytes).tolist(), record["lengths"].tolist(), strict=True
        ):
            data = heap[position : position + v + r + t + c].tobytes()
            version = data[:v]
            name = known_versions.get(version)
            if name is None:
                name = known_versions[version] = version.decode()
            versions.append(name)
            request_ids.append(data[v : v + r].decode())
            transaction_ids.append(data[v + r : v + r + t].decode())
            clients.append(data[v + r + t :].decode() or None)
        last = record[-1]
        traces: dict[tuple, None] = {}
        traced = np.flatnonzero(record["trace"] != NO_TRACE)
        for kind, hi, lo, span in record[["trace", "trace_hi", "trace_lo", "span_id"]][
            traced
        ].tolist():
            parent = None if kind == TRACED else ("", "", kind == PARENT_SAMPLED)
            traces[((hi << 64) | lo, span, parent)] = None
        return TakenRows(
            count,
            versions,
            request_ids,
            transaction_ids,
            clients,
            record["time_ms"].copy(),
            record["card_key"].copy(),
            record["probability"].copy(),
            record["decision"].copy(),
            _DECISIONS[record["decision"]],
            record["latency_us"].copy(),
            features,
            list(traces),
            int(last["strings_at"]) + int(last["lengths"].sum()),
        )

    def release(self, taken: TakenRows) -> None:
        """Free the slots and strings of rows taken (and scored)."""
        read = int(self._header[READ_SEQUENCE]) + taken.count
        store_ordered(self._header, HEAP_READ, taken.heap_end)  # after the reads of the rows
        store_ordered(self._header, READ_SEQUENCE, read)
