"""Round-robin of new connections over the workers' SO_REUSEPORT listeners.

All workers listen on one port with SO_REUSEPORT, and by default the kernel picks the
worker of a new connection by a hash of its addresses and ports. gRPC clients keep few,
long-lived connections, so the split is often uneven: two connections land on one
worker half the time, leaving the other core idle (measured: 8.4k req/s in that case
against 10.7k-11.1k balanced, h2load c=2 on the 2-core VM); of 8 connections, two
workers get 4 and 4 only about a quarter of the time.

:func:`spread_connections` attaches a small eBPF program to the port's reuseport group
(``SO_ATTACH_REUSEPORT_EBPF``) that hands new connections to the group's listeners in
turn: 8 connections over 2 workers are 4 and 4. Each worker attaches it once its server
listens (the last one attached serves the group; a replacement worker's program starts
its count again). The counter is read and written without an atomic, so two handshakes
on two cores at the same instant may take the same turn, and the split is then off by
one. While the group holds fewer listeners than workers (one is starting or being
replaced), a turn that names a missing listener falls back to the kernel's hash.

Loading the program needs CAP_BPF (root, in practice, where
``kernel.unprivileged_bpf_disabled`` is set); without it the kernel's hash stays and
the worker says why in its log.
"""

from __future__ import annotations

import ctypes
import os
import platform
import socket
import struct

_BPF_SYSCALL = {"x86_64": 321, "aarch64": 280}
_BPF_MAP_CREATE, _BPF_PROG_LOAD = 0, 5
_BPF_MAP_TYPE_ARRAY = 2
_BPF_PROG_TYPE_SOCKET_FILTER = 1
_BPF_PSEUDO_MAP_FD = 1
_BPF_FUNC_MAP_LOOKUP_ELEM = 1
_SO_ATTACH_REUSEPORT_EBPF = 52
_ATTR_SIZE = 128  # bytes of union bpf_attr passed (the kernel wants the rest zeroed)


class BalanceUnavailable(OSError):
    """The round-robin cannot be attached here (no permission, no eBPF, not Linux)."""


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    """One eBPF instruction: opcode, registers, offset, immediate (struct bpf_insn)."""
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def round_robin_instructions(map_fd: int, listeners: int) -> bytes:
    """The program: index = counter % listeners, counter += 1 (the counter is element 0
    of the array map ``map_fd``). A socket filter attached to a reuseport group returns
    the index of the listener that gets the connection."""
    return b"".join(
        (
            _insn(0x62, dst=10, off=-4, imm=0),  # *(u32 *)(fp - 4) = 0: the key
            _insn(0xBF, dst=2, src=10),  # r2 = fp
            _insn(0x07, dst=2, imm=-4),  # r2 -= 4: &key
            _insn(0x18, dst=1, src=_BPF_PSEUDO_MAP_FD, imm=map_fd),  # r1 = the map
            _insn(0x00),  # (second half of the 64-bit load)
            _insn(0x85, imm=_BPF_FUNC_MAP_LOOKUP_ELEM),  # r0 = &counter or NULL
            _insn(0x15, dst=0, off=7, imm=0),  # if r0 == NULL goto fallback
            _insn(0x61, dst=1, src=0),  # r1 = counter
            _insn(0xBF, dst=2, src=1),  # r2 = r1
            _insn(0x04, dst=2, imm=1),  # r2 += 1 (32 bits: wraps)
            _insn(0x63, dst=0, src=2),  # counter = r2
            _insn(0xBF, dst=0, src=1),  # r0 = r1
            _insn(0x94, dst=0, imm=listeners),  # r0 %= listeners
            _insn(0x95),  # return r0
            _insn(0xB7, dst=0, imm=0),  # fallback: r0 = 0
            _insn(0x95),  # return r0
        )
    )


def _bpf(command: int, attr: bytes) -> int:
    number = _BPF_SYSCALL.get(platform.machine())
    if number is None or platform.system() != "Linux":
        where = f"{platform.system()} {platform.machine()}"
        raise BalanceUnavailable(f"eBPF is not available on {where}")
    libc = ctypes.CDLL(None, use_errno=True)
    buffer = ctypes.create_string_buffer(attr, _ATTR_SIZE)
    result = libc.syscall(number, command, buffer, _ATTR_SIZE)
    if result < 0:
        errno = ctypes.get_errno()
        raise BalanceUnavailable(errno, f"bpf({command}): {os.strerror(errno)}")
    return result


def load_round_robin(listeners: int) -> int:
    """Load the round-robin program for a group of ``listeners``; returns its fd."""
    if not 1 <= listeners < 2**31:
        raise ValueError(f"listeners: expected a positive count, got {listeners}")
    map_fd = _bpf(_BPF_MAP_CREATE, struct.pack("<IIIII", _BPF_MAP_TYPE_ARRAY, 4, 4, 1, 0))
    try:
        code = round_robin_instructions(map_fd, listeners)
        instructions = ctypes.create_string_buffer(code, len(code))
        license_ = ctypes.create_string_buffer(b"GPL")
        log = ctypes.create_string_buffer(4096)
        attr = struct.pack(
            "<IIQQIIQ",
            _BPF_PROG_TYPE_SOCKET_FILTER,
            len(code) // 8,
            ctypes.addressof(instructions),
            ctypes.addressof(license_),
            1,  # verifier log level: its reason comes back in the error
            len(log),
            ctypes.addressof(log),
        )
        try:
            return _bpf(_BPF_PROG_LOAD, attr)
        except BalanceUnavailable as exc:
            reason = log.value.decode(errors="replace").strip().splitlines()
            cause = exc.strerror or str(exc)
            detail = f"{cause}: {reason[-1]}" if reason else cause
            raise BalanceUnavailable(exc.errno, detail) from exc
    finally:
        os.close(map_fd)  # the loaded program holds its own reference to the map


def listening_sockets(port: int) -> list[int]:
    """File descriptors of this process's TCP sockets listening on ``port``."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError as exc:
        raise BalanceUnavailable(f"cannot list this process's sockets: {exc}") from exc
    found = []
    for name in names:
        fd = int(name)
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            copy = os.dup(fd)
        except OSError:  # closed meanwhile
            continue
        try:
            probe = socket.socket(fileno=copy)
        except OSError:  # the number was reused for something else meanwhile
            os.close(copy)
            continue
        with probe:  # closes the copy only
            try:
                if (
                    probe.family in (socket.AF_INET, socket.AF_INET6)
                    and probe.type == socket.SOCK_STREAM
                    and probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                    and probe.getsockname()[1] == port
                ):
                    found.append(fd)
            except OSError:
                continue
    return found


def spread_connections(port: int, listeners: int) -> int:
    """Attach the round-robin to the reuseport group(s) of this process's listeners on
    ``port`` (an IPv4 and an IPv6 listener are two groups); returns how many listeners
    it was attached through. Raises :class:`BalanceUnavailable` where it cannot be."""
    fds = listening_sockets(port)
    if not fds:
        return 0
    program = load_round_robin(listeners)
    try:
        for fd in fds:
            with socket.socket(fileno=os.dup(fd)) as listener:
                listener.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_REUSEPORT_EBPF, program)
    except OSError as exc:
        raise BalanceUnavailable(exc.errno, f"SO_ATTACH_REUSEPORT_EBPF: {exc.strerror}") from exc
    finally:
        os.close(program)  # the group holds the program now
    return len(fds)
