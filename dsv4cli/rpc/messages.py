"""What a ggml-rpc request may say before the relay lets it reach ggml-rpc-server: the layout of every command and
the checks that keep a client from crashing the server or growing it past the budget.

Layouts are those of `ggml/src/ggml-rpc/ggml-rpc.cpp` in llama-cpp-python 0.3.36's llama.cpp (protocol 7.0.0):
fixed-size requests (`FIXED`), SET_TENSOR (`rpc_tensor | cache flag | offset | data`) and GRAPH_COMPUTE
(`device | n_nodes | node ids | n_tensors | rpc_tensors`). The server trusts much of what they say: a tensor past
its buffer's end is a GGML_ASSERT (SIGABRT), a read or write past the tensor's own end another, a null graph node a
SIGSEGV, a deep chain of sources a stack overflow, a custom op a function pointer called; and it reserves a
variable-size message's declared size before reading it. `Session` knows the buffers the client allocated
(their base and size) and refuses every request that names anything else or reaches outside them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

from dsv4cli.rpc.protocol import ALLOC_REQUEST, CAPS_SIZE, TENSOR, U64, Cmd

# ggml_type -> (block size, bytes per block), from ggml.c's type_traits; removed types (4, 5, 31-33, 36-38) absent
TYPE_SIZES = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 40),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
    16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110), 22: (256, 82),
    23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 29: (256, 56), 30: (1, 2),
    34: (256, 54), 35: (256, 66), 39: (32, 17), 40: (64, 36), 41: (128, 18), 42: (64, 18),
}  # fmt: skip
OP_COUNT = 101  # GGML_OP_COUNT
CUSTOM_OPS = frozenset({92, 93, 94, 95})  # MAP_CUSTOM1-3, CUSTOM: op_params hold a function pointer to call
TENSOR_SIZE = TENSOR.size  # 296
SET_HEADER = TENSOR_SIZE + 1 + U64.size  # rpc_tensor | cache flag | offset
GRAPH_HEAD = struct.Struct("<II")  # device, n_nodes
TENSOR_HEAD = struct.Struct("<QIQ4I4II")  # rpc_tensor's id, type, buffer, ne, nb, op: what `Session.tensor` reads
DATA_AT = TENSOR_SIZE - 64 - 4 - 8  # rpc_tensor's data (before name and use_count)
FIXED = {
    Cmd.ALLOC_BUFFER: ALLOC_REQUEST.size, Cmd.GET_ALIGNMENT: 4, Cmd.GET_MAX_SIZE: 4, Cmd.BUFFER_GET_BASE: 8,
    Cmd.FREE_BUFFER: 8, Cmd.BUFFER_CLEAR: 9, Cmd.SET_TENSOR_HASH: TENSOR_SIZE + 16, Cmd.GET_TENSOR: TENSOR_SIZE + 16,
    Cmd.COPY_TENSOR: 2 * TENSOR_SIZE, Cmd.GET_DEVICE_MEMORY: 4, Cmd.INIT_TENSOR: TENSOR_SIZE,
    Cmd.GET_ALLOC_SIZE: 4 + 11 * TENSOR_SIZE, Cmd.HELLO: CAPS_SIZE, Cmd.DEVICE_COUNT: 0, Cmd.GRAPH_RECOMPUTE: 4,
    Cmd.MEMSET_TENSOR: TENSOR_SIZE + 17,
}  # fmt: skip
MAX_GRAPH_BYTES = 256 << 20  # ~900k tensors; llama.cpp's graphs for one worker are a few MB
MAX_BUFFERS = 4096  # live allocations per client; llama.cpp makes a few dozen
MAX_SOURCE_DEPTH = 1024  # the server builds graphs recursively; legit graphs recurse a few levels

# rpc_tensor as a numpy record, to check a whole graph's tensors at once
TENSOR_DTYPE = np.dtype([
    ("id", "<u8"), ("type", "<u4"), ("buffer", "<u8"), ("ne", "<u4", 4), ("nb", "<u4", 4), ("op", "<u4"),
    ("op_params", "<i4", 16), ("flags", "<i4"), ("src", "<u8", 10), ("view_src", "<u8"), ("view_offs", "<u8"),
    ("data", "<u8"), ("name", "S64"), ("use_count", "<i4"),
])  # fmt: skip
assert TENSOR_DTYPE.itemsize == TENSOR_SIZE
_BLOCK = np.zeros(256, np.float64)
_BYTES = np.zeros(256, np.float64)
for _t, (_b, _s) in TYPE_SIZES.items():
    _BLOCK[_t], _BYTES[_t] = _b, _s


class Refused(Exception):
    """A request the relay does not forward; the message says what was wrong with it."""


@dataclass(frozen=True)
class Buffer:
    base: int
    size: int


@dataclass
class Session:
    """What one client has: its buffers (remote pointer -> base and size) and the server's device count."""

    devices: int = 1
    buffers: dict[int, Buffer] = field(default_factory=dict)

    @property
    def allocated(self) -> int:
        return sum(b.size for b in self.buffers.values())

    def device(self, payload: bytes, what: str) -> None:
        (dev,) = struct.unpack_from("<I", payload)
        if dev >= self.devices:
            raise Refused(f"{what} names device {dev}; the server has {self.devices}")

    def buffer(self, ptr: int, what: str) -> Buffer:
        if ptr not in self.buffers:
            raise Refused(f"{what} names buffer {ptr:#x}, which this client did not allocate")
        return self.buffers[ptr]

    def tensor(self, raw: bytes | memoryview, what: str, *, allocated: bool = True) -> tuple[int, int]:
        """Check one rpc_tensor as `tensors` does (in plain integers: one tensor per request is the common case,
        and numpy's per-call cost would dominate); (data, nbytes)."""
        if len(raw) < TENSOR_SIZE:
            raise Refused(f"{what}: a tensor of {len(raw)} bytes; its layout has {TENSOR_SIZE}")
        _, ttype, buffer, n0, n1, n2, n3, b0, b1, b2, b3, op = TENSOR_HEAD.unpack_from(raw)
        (data,) = U64.unpack_from(raw, DATA_AT)
        if ttype not in TYPE_SIZES:
            raise Refused(f"{what}: tensor of unknown ggml type {ttype}")
        if op >= OP_COUNT or op in CUSTOM_OPS:
            raise Refused(f"{what}: tensor with op {op} (unknown, or a custom op)")
        size = _nbytes(ttype, (n0, n1, n2, n3), (b0, b1, b2, b3))
        if buffer == 0:
            if allocated or data:
                raise Refused(f"{what}: tensor without a buffer" if allocated else f"{what}: data but no buffer")
            return data, size
        b = self.buffer(buffer, what)
        if data < b.base or data + size > b.base + b.size:
            name = raw[DATA_AT + 8 : DATA_AT + 72].split(b"\0", 1)[0].decode(errors="replace")
            raise Refused(f"{what}: tensor {name!r} lies outside its buffer")
        return data, size

    def tensors(self, t: np.ndarray, what: str, *, allocated: bool = True) -> None:
        """Check rpc_tensors at once: known type and op, and (when `allocated`, or when they name a buffer) data that
        lies inside a buffer this client allocated."""
        bad = (t["type"] >= len(_BLOCK)) | (_BLOCK[np.minimum(t["type"], 255)] == 0)
        if bad.any():
            raise Refused(f"{what}: tensor of unknown ggml type {int(t['type'][bad][0])}")
        bad = (t["op"] >= OP_COUNT) | np.isin(t["op"], list(CUSTOM_OPS))
        if bad.any():
            raise Refused(f"{what}: tensor with op {int(t['op'][bad][0])} (unknown, or a custom op)")
        named = t["buffer"] != 0
        if allocated and not named.all():
            raise Refused(f"{what}: tensor without a buffer")
        if not named.any():
            if (t["data"] != 0).any():
                raise Refused(f"{what}: tensor with data but no buffer")
            return
        ptrs = t["buffer"][named]
        known = np.array(sorted(self.buffers), dtype=np.uint64)
        where = np.minimum(np.searchsorted(known, ptrs), max(len(known) - 1, 0))
        found = known[where] == ptrs if len(known) else np.zeros(len(ptrs), bool)
        if not found.all():
            raise Refused(f"{what} names buffer {int(ptrs[~found][0]):#x}, which this client did not allocate")
        base = np.array([self.buffers[int(p)].base for p in known], dtype=np.float64)[where]
        end = base + np.array([self.buffers[int(p)].size for p in known], dtype=np.float64)[where]
        data = t["data"][named].astype(np.float64)
        outside = (data < base) | (data + nbytes(t[named]) > end)
        if outside.any():
            raise Refused(f"{what}: tensor {_name(t[named][outside][0])!r} lies outside its buffer")


def nbytes(t: np.ndarray) -> np.ndarray:
    """ggml_nbytes of rpc_tensors (float64: exact below 2**53, and anything above is outside every buffer)."""
    ne, nb = t["ne"].astype(np.float64), t["nb"].astype(np.float64)
    block, size = _BLOCK[np.minimum(t["type"], 255)], _BYTES[np.minimum(t["type"], 255)]
    unit = block == 1
    first = np.where(unit, size + (ne[:, 0] - 1) * nb[:, 0], np.floor(ne[:, 0] * nb[:, 0] / np.maximum(block, 1)))
    total = first + ((ne[:, 1:] - 1) * nb[:, 1:]).sum(axis=1)
    return np.where((ne == 0).any(axis=1), 0.0, total)


def _nbytes(ttype: int, ne: tuple[int, ...], nb: tuple[int, ...]) -> int:
    """ggml_nbytes of one tensor, in integers."""
    if 0 in ne:
        return 0
    block, size = TYPE_SIZES[ttype]
    first = size + (ne[0] - 1) * nb[0] if block == 1 else ne[0] * nb[0] // block
    return first + (ne[1] - 1) * nb[1] + (ne[2] - 1) * nb[2] + (ne[3] - 1) * nb[3]


def _name(t: np.void) -> str:
    return t["name"].split(b"\0", 1)[0].decode(errors="replace")


def check_fixed(cmd: Cmd, payload: bytes, session: Session) -> None:
    """Refuse a fixed-size request that names a device, buffer or tensor region the client does not have."""
    what = cmd.name
    if cmd in (Cmd.ALLOC_BUFFER, Cmd.GET_ALIGNMENT, Cmd.GET_MAX_SIZE, Cmd.GET_DEVICE_MEMORY, Cmd.GRAPH_RECOMPUTE):
        session.device(payload, what)
    elif cmd in (Cmd.BUFFER_GET_BASE, Cmd.FREE_BUFFER, Cmd.BUFFER_CLEAR):
        session.buffer(U64.unpack_from(payload)[0], what)
    elif cmd == Cmd.GET_ALLOC_SIZE:
        session.device(payload, what)
        tensors = np.frombuffer(payload, TENSOR_DTYPE, count=11, offset=4)
        session.tensors(tensors[(np.arange(11) == 0) | (tensors["id"] != 0)], what, allocated=False)
    elif cmd == Cmd.INIT_TENSOR:
        session.tensor(payload, what, allocated=False)
    elif cmd == Cmd.COPY_TENSOR:
        _, src_bytes = session.tensor(payload[:TENSOR_SIZE], what)
        dst, _ = session.tensor(payload[TENSOR_SIZE:], what)
        (ptr,) = struct.unpack_from("<Q", payload, TENSOR_SIZE + 12)  # dst.buffer
        buffer = session.buffers[ptr]
        if dst + src_bytes > buffer.base + buffer.size:
            raise Refused(f"{what}: the copy runs past the destination buffer's end")
    elif cmd in (Cmd.GET_TENSOR, Cmd.MEMSET_TENSOR, Cmd.SET_TENSOR_HASH):
        _, size = session.tensor(payload[:TENSOR_SIZE], what)
        offset, length = struct.unpack_from("<QQ", payload, TENSOR_SIZE)
        if cmd != Cmd.SET_TENSOR_HASH and offset + length > size:
            raise Refused(f"{what}: bytes {offset}..{offset + length} of a {size}-byte tensor")


def check_set_tensor(header: bytes, data_size: int, session: Session) -> int:
    """SET_TENSOR's header (before its data is read): the write must lie inside the tensor; returns the offset."""
    _, size = session.tensor(header, "SET_TENSOR")  # its first TENSOR_SIZE bytes
    (offset,) = U64.unpack_from(header, TENSOR_SIZE + 1)
    if offset + data_size > size:
        raise Refused(f"SET_TENSOR: {data_size} bytes at offset {offset} of a {size}-byte tensor")
    return offset


def check_graph(payload: bytes, session: Session) -> None:
    """GRAPH_COMPUTE: exact layout, a device the server has, every node a tensor of the message, every source a
    tensor of the message, every tensor inside a buffer of this client (or, from another device's buffer, without
    buffer or data, as llama.cpp sends those), and source chains the server's recursive graph builder can follow
    without overflowing its stack."""
    if len(payload) < GRAPH_HEAD.size + 4:
        raise Refused("GRAPH_COMPUTE: shorter than its header")
    session.device(payload, "GRAPH_COMPUTE")
    _, n_nodes = GRAPH_HEAD.unpack_from(payload)
    at = GRAPH_HEAD.size + 8 * n_nodes
    if len(payload) < at + 4:
        raise Refused(f"GRAPH_COMPUTE: {n_nodes} nodes do not fit in {len(payload)} bytes")
    (n_tensors,) = struct.unpack_from("<I", payload, at)
    if len(payload) != at + 4 + n_tensors * TENSOR_SIZE:
        raise Refused(f"GRAPH_COMPUTE: {n_nodes} nodes and {n_tensors} tensors do not make {len(payload)} bytes")
    nodes = np.frombuffer(payload, "<u8", count=n_nodes, offset=GRAPH_HEAD.size)
    tensors = np.frombuffer(payload, TENSOR_DTYPE, count=n_tensors, offset=at + 4)
    ids = np.unique(tensors["id"])
    if len(ids) != n_tensors or (ids == 0).any():
        raise Refused("GRAPH_COMPUTE: tensor ids are zero or repeated")
    if not np.isin(nodes, ids).all():
        raise Refused("GRAPH_COMPUTE: a graph node is null or not among the message's tensors")
    links = np.concatenate([tensors["src"], tensors["view_src"][:, None]], axis=1)
    if not np.isin(links[links != 0], ids).all():
        raise Refused("GRAPH_COMPUTE: a tensor's source is not among the message's tensors")
    session.tensors(tensors, "GRAPH_COMPUTE", allocated=False)  # a tensor of another device's buffer has none
    if n_tensors > MAX_SOURCE_DEPTH:  # a chain cannot be longer than the tensors there are
        _check_depth(nodes, tensors["id"], links)


def _check_depth(nodes: np.ndarray, ids: np.ndarray, links: np.ndarray) -> None:
    """Follow the server's create_node recursion (nodes in order, each tensor built once) without recursing."""
    index = {int(i): n for n, i in enumerate(ids)}
    built: set[int] = set()
    for node in nodes.tolist():
        stack = [(node, 0)]
        while stack:
            tid, depth = stack.pop()
            if tid == 0 or tid in built:
                continue
            if depth > MAX_SOURCE_DEPTH:
                raise Refused(f"GRAPH_COMPUTE: a chain of sources deeper than {MAX_SOURCE_DEPTH}")
            built.add(tid)
            stack.extend((int(s), depth + 1) for s in reversed(links[index[tid]].tolist()) if s)
