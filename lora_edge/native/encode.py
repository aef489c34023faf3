"""Adapter tensors as the native kernel reads them: float16, int8 with per-rank scales, or the q8x order in one
w8a8 blob (layout: :mod:`lora_edge.native.contract`). Numpy only: the compile side writes adapter files with it,
and the device side encodes adapters it loads itself."""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from ..config import LoraDtype
from .contract import BLOB_ALIGN, BLOB_FIELDS, Q8X_K_BLOCK, W8A8_BLOB, scale_names

def quantize_int8(m: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 codes of ``m`` with one float32 scale per slice along ``axis`` (max |m| / 127;
    an all-zero slice gets scale 0 and zero codes)."""
    m = np.asarray(m, np.float32)
    scale = np.abs(m).max(axis=axis) / np.float32(127) if m.size else np.zeros(np.delete(m.shape, axis), np.float32)
    safe = np.expand_dims(np.where(scale > 0, scale, 1), axis)
    return np.clip(np.rint(m / safe), -127, 127).astype(np.int8), scale.astype(np.float32)



def q8x_rows(k: int) -> int:
    """Rows of a q8x A of ``k`` inputs: K zero-padded to a multiple of Q8X_K_BLOCK, 4 codes to a row."""
    return -(-k // Q8X_K_BLOCK) * Q8X_K_BLOCK // 4


def quantize_q8x(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(A, A_scale, B, B_scale) of a float pair in the q8x order of LoraDeltaQ8 (native/src).

    ``a`` (K, R); ``b`` (R, N) (one chunk) or (chunks, r, c) with R = n_modules * r. Each module's ranks are
    zero-padded to a multiple of 4, then quantized as :func:`encode` does (A per column, B per row); the codes
    go in the order of 4-wide dot products: A (ceil(K / 32) * 8, R4, 4) with byte [q, j, i] = A[4 q + i, j]
    (K zero-padded to a multiple of 32), B (chunks, r4 / 4, c, 4) with [g, q, n, i] = B_g[4 q + i, n], each
    code stored XOR 0x80 (the kernel reads it as an unsigned byte, code + 128)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if b.ndim == 2:
        b = b[None]
    k, chunks, r, c = a.shape[0], b.shape[0], b.shape[1], b.shape[2]
    n = a.shape[1] // r if r else 0
    r4 = -(-r // 4) * 4
    a = np.pad(a.reshape(k, n, r), ((0, 0), (0, 0), (0, r4 - r))).reshape(k, n * r4)
    b = np.pad(b, ((0, 0), (0, r4 - r), (0, 0)))
    qa, sa = quantize_int8(a, axis=0)
    qb, sb = quantize_int8(b, axis=-1)
    kp = 4 * q8x_rows(k)
    qa = np.pad(qa, ((0, kp - k), (0, 0))).reshape(kp // 4, 4, n * r4).transpose(0, 2, 1)
    qb = qb.reshape(chunks, r4 // 4, 4, c).transpose(0, 1, 3, 2)

    def flip(codes: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray((codes.view(np.uint8) ^ np.uint8(0x80)).view(np.int8))

    return flip(qa), sa, flip(qb), sb



Q8xParts = tuple  # (qa, sa, qb, sb) of one branch, as quantize_q8x returns them


def w8a8_blob(parts: Sequence[tuple[tuple[int, int], tuple[np.ndarray, np.ndarray] | None]]) -> np.ndarray:
    """The w8a8 blob: one int8 tensor holding every q8x branch's A, B and scales, so that a run binds one input for all
    of them. ``parts``: per branch of the package, in its order, ((chunks, c), the float (A, B) as :func:`quantize_q8x`
    takes them, or None where the adapter leaves the branch alone)."""
    return pack_blob([(geometry, quantize_q8x(*pair) if pair is not None else None) for geometry, pair in parts])


def pack_blob(parts: Sequence[tuple[tuple[int, int], Q8xParts | None]]) -> np.ndarray:
    """The blob of already quantized branches. Layout: int64 n, then per branch the int64 fields of
    :data:`~lora_edge.native.contract.BLOB_FIELDS`, then the arrays, each at a multiple of
    :data:`~lora_edge.native.contract.BLOB_ALIGN` bytes."""
    n_fields = len(BLOB_FIELDS)
    header = np.zeros(1 + n_fields * len(parts), np.int64)
    header[0] = len(parts)
    pieces, at = [header.view(np.int8)], header.nbytes

    def put(arr: np.ndarray) -> int:
        nonlocal at
        pad = -at % BLOB_ALIGN
        pieces.extend([np.zeros(pad, np.int8), np.ascontiguousarray(arr).reshape(-1).view(np.int8)])
        at += pad
        start, at = at, at + arr.nbytes
        return start

    for i, ((chunks, c), q) in enumerate(parts):
        fields = [0, 0, 0, 0, 0, chunks, 0, c]
        if q is not None:
            qa, sa, qb, sb = q
            fields = [put(qa), put(sa), put(qb), put(sb), qa.shape[1], qb.shape[0], 4 * qb.shape[1], qb.shape[2]]
        header[1 + n_fields * i : 1 + n_fields * (i + 1)] = fields
    return np.concatenate(pieces)


def unpack_blob(blob: np.ndarray, k_rows: Sequence[int]) -> list[tuple[tuple[int, int], Q8xParts | None]]:
    """The branches of a blob (the inverse of :func:`pack_blob`); ``k_rows``: each branch's A rows in the q8x order
    (ceil(K / 32) * 8), which the header does not record."""
    raw = np.ascontiguousarray(blob).view(np.int8).reshape(-1)
    n_fields = len(BLOB_FIELDS)
    n = int(raw[:8].view(np.int64)[0])
    header = raw[8 : 8 * (1 + n_fields * n)].view(np.int64).reshape(n, n_fields)
    out = []
    for (a_at, sa_at, b_at, sb_at, rank, chunks, r, c), rows in zip(header.tolist(), k_rows):
        if rank == 0:
            out.append(((chunks, c), None))
            continue
        qa = raw[a_at : a_at + rows * rank * 4].reshape(rows, rank, 4)
        sa = raw[sa_at : sa_at + 4 * rank].view(np.float32)
        qb = raw[b_at : b_at + chunks * r * c].reshape(chunks, r // 4, c, 4)
        sb = raw[sb_at : sb_at + 4 * chunks * r].view(np.float32).reshape(chunks, r)
        out.append(((chunks, c), (qa, sa, qb, sb)))
    return out


def encode(tensors: dict[str, np.ndarray], pairs: Iterable[tuple[str, str]], lora_dtype: LoraDtype,
           blob_slots: Sequence[tuple[str, str, int, int]] = ()) -> dict[str, np.ndarray]:  # fmt: skip
    """``tensors`` with each (lora_A, lora_B) pair of ``pairs`` stored as a native package stores it:
    float16, or int8 with A scaled per column (rank) and B per row (rank, per chunk when chunked) —
    A (K, R) -> codes (K, R) + scales (R); B (R, N) -> (R,) or (chunks, r, c) -> (chunks, r). "w8a8": the same
    int8 codes in the q8x order (:func:`quantize_q8x`), multiplied by int8 activations (x and x @ A quantized on the
    fly), for the package's ``blob_slots`` ((lora_A, lora_B, chunks, c) per q8x branch, in its order), all in one
    tensor :data:`W8A8_BLOB` (:func:`w8a8_blob`); the other pairs as "int8"."""
    lora_dtype = LoraDtype(lora_dtype)
    out = dict(tensors)
    in_blob = {(a, b) for a, b, _, _ in blob_slots} if lora_dtype is LoraDtype.W8A8 else set()
    for a_name, b_name in pairs:
        if a_name not in tensors or (a_name, b_name) in in_blob:
            continue
        if lora_dtype is LoraDtype.FLOAT16:
            out[a_name], out[b_name] = tensors[a_name].astype(np.float16), tensors[b_name].astype(np.float16)
        else:
            sa, sb = scale_names(a_name, b_name)
            out[a_name], out[sa] = quantize_int8(tensors[a_name], axis=0)
            out[b_name], out[sb] = quantize_int8(tensors[b_name], axis=-1)
    if lora_dtype is LoraDtype.W8A8:
        out[W8A8_BLOB] = w8a8_blob([((chunks, c), (tensors[a], tensors[b]) if a in tensors else None) for a, b, chunks, c in blob_slots])
        for a, b, _, _ in blob_slots:
            out.pop(a, None), out.pop(b, None)
    return out
