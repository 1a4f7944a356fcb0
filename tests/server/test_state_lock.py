"""The shared card state's spinlock: serialises processes, and a dead owner's lock breaks."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from riskwire.kernels.atomics import spin_lock
from riskwire.kernels.encoding import encode_columns
from riskwire.kernels.state import CNT_TXN, HDR_LOCK
from riskwire.server.state import SharedCardState

ROWS_PER_PROCESS = 3000


def one_card(rows: int, start_ms: int):
    return encode_columns({
        "card_id": ["card-shared"] * rows, "merchant_id": ["m"] * rows, "mcc": [5411] * rows,
        "amount": [1.0] * rows, "currency": ["EUR"] * rows, "country": ["DE"] * rows,
        "card_country": ["DE"] * rows, "channel": ["pos"] * rows,
        "event_time": np.arange(start_ms, start_ms + rows, dtype=np.int64),
    })  # fmt: skip


# Child process: apply one transaction at a time to the shared card. (A script, since
# spawn could not re-import this module under pytest's importlib import mode.)
HAMMER = """
import sys, numpy as np
from riskwire.kernels.encoding import encode_columns
from riskwire.server.state import SharedCardState
name, start, rows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
state = SharedCardState.attach(name)
# A plain subprocess has its own resource tracker, which would unlink the segment when
# this process exits (spawn-started server workers share the supervisor's instead).
from multiprocessing import resource_tracker
resource_tracker.unregister(state._memory._name, "shared_memory")
tx = encode_columns({
    "card_id": ["card-shared"] * rows, "merchant_id": ["m"] * rows, "mcc": [5411] * rows,
    "amount": [1.0] * rows, "currency": ["EUR"] * rows, "country": ["DE"] * rows,
    "card_country": ["DE"] * rows, "channel": ["pos"] * rows,
    "event_time": np.arange(start, start + rows, dtype=np.int64),
})
out = np.empty((1, 23))
for i in range(rows):
    state.update(tx.take(slice(i, i + 1)), out)
import os
os._exit(0)  # skip SharedMemory.__del__ while numpy views of it are alive
"""


def test_processes_updating_one_card_lose_no_update() -> None:
    state = SharedCardState.create(1024)
    try:
        workers = [
            subprocess.Popen(
                [sys.executable, "-c", HAMMER, state.name, str(k * 10**6), str(ROWS_PER_PROCESS)]
            )
            for k in range(3)
        ]
        for worker in workers:
            assert worker.wait(120) == 0
        slot = state.table.find(int(one_card(1, 0).card_key[0]))
        assert state.table.counts[slot, CNT_TXN] == 3 * ROWS_PER_PROCESS
        assert state.table.header[HDR_LOCK] == 0
    finally:
        state.close()


def test_lock_of_a_dead_owner_is_broken_and_state_usable_again() -> None:
    state = SharedCardState.create(1024)
    try:
        dead_pid = 2**22 + 12345  # a pid no live process of ours has
        spin_lock(state.table.header, HDR_LOCK, dead_pid)
        assert not state.break_lock_of(4242)  # someone else's pid: left alone
        assert state.break_lock_of(dead_pid)
        features = state.update(one_card(1, 0), np.empty((1, 23)))
        assert features[0, -1] == 0.0  # first transaction of the card
        assert state.table.header[HDR_LOCK] == 0
    finally:
        state.close()
