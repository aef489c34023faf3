"""Block-wise weight-only quantization in ONNX Runtime's MatMulNBits layout (compile side, numpy).

A weight W of shape (N, K) (HF layout: out_features x in_features) is cut along K into blocks of
``block`` values; each block stores ``bits``-bit codes q and per-block parameters:

    W_hat[n, k] = (q[n, k] - zp[n, b]) * scale[n, b] + offset[n, b],     b = k // block

Three block formats ("zero"):

| zero     | zp                  | offset        | bits/weight at 4 bits, block 32 | kernel |
|----------|---------------------|---------------|---------------------------------|--------|
| int      | uint8 per block     | 0             | 4 + 1 (fp32 scale) + 0.125      | MatMulNBits |
| none     | 2^(bits-1), implied | 0             | 4 + 1                            | MatMulNBits (symmetric) |
| float    | 2^(bits-1), implied | fp16 per block| 4 + 0.5 (fp16 scale) + 0.5       | MatMulNBits + a small correction |

``int`` must represent 0 exactly, so a block's range always contains 0; ``float`` places its 2^bits
levels anywhere (min-max, like llama.cpp's Q4_1 and HQQ). MatMulNBits only has a fast integer
kernel, so lora-edge runs the float offsets as a separate correction: y += blocksum(x) @ offset.T,
where blocksum(x) has K/block columns — 1/block of the main product's work. A base that was
itself a Q4_1 GGUF is represented exactly this way (same blocks, same grid).

Layout (what MatMulNBits reads): codes (N, n_blocks, block*bits/8) uint8, two codes per byte at 4
bits, low nibble first; scales (N, n_blocks); zero points (N, ceil(n_blocks*bits/8)) uint8, padded
with the mid-point like ONNX Runtime's quantizer. K is zero-padded up to a whole block.

Algorithms: ``rtn`` (round to nearest over the block's range; for ``int`` this is byte-identical to
ONNX Runtime's own quantizer), ``search`` (the range of each block is shrunk by the factor, among a
grid, that minimises the block's squared error, as llama.cpp's k-quants do), ``gptq`` (see :func:`gptq`).
"""

from __future__ import annotations

import os
from concurrent.futures import Executor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass

import numpy as np

from ...config import QuantAlgo, WeightType, ZeroPoint, check_block_size, module_matches
from ...errors import InputError

SHRINK_GRID = tuple(np.round(np.linspace(1.0, 0.6, 17), 4))
SEARCH_ELEMENTS = 1 << 14  # weights searched at a time: the search's float64 temporaries (x shrinks) stay in cache


@dataclass(frozen=True)
class QTensor:
    """A quantized (N, K) weight in MatMulNBits layout."""

    codes: np.ndarray  # (N, n_blocks, block*bits/8) uint8
    scales: np.ndarray  # (N, n_blocks) float32, or float16 with zero="float" and in Q8_0 tables (quantize_q8_0)
    zero_points: np.ndarray | None  # (N, ceil(n_blocks*bits/8)) uint8 with zero="int"
    bits: int
    block: int
    k: int  # the true K (before padding)
    offsets: np.ndarray | None = None  # (N, n_blocks) float16 with zero="float"

    @property
    def n(self) -> int:
        return self.codes.shape[0]

    @property
    def n_blocks(self) -> int:
        return self.scales.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.codes, self.scales, self.zero_points, self.offsets) if a is not None)


def check_params(bits: int, block: int) -> None:
    if bits not in (4, 8):
        raise InputError(f"bits must be 4 or 8, got {bits}")
    check_block_size(block)


def _blocks(w: np.ndarray, block: int) -> np.ndarray:
    """(N, K) -> (N, n_blocks, block), zero-padded along K."""
    n, k = w.shape
    nb = -(-k // block)
    if nb * block != k:
        w = np.pad(w, ((0, 0), (0, nb * block - k)))
    return w.reshape(n, nb, block)


def block_params(v: np.ndarray, bits: int, zero: str, shrink: float = 1.0):
    """(scale, zp, offset) for blocks ``v`` (..., block), the range shrunk by ``shrink``; float64."""
    qmax, half = 2**bits - 1, 2 ** (bits - 1)
    lo, hi = v.min(-1), v.max(-1)
    if zero == ZeroPoint.INT:
        lo, hi = np.minimum(lo, 0.0) * shrink, np.maximum(hi, 0.0) * shrink
        scale = (hi - lo) / qmax
        zp = np.clip(np.rint(-lo / np.where(scale == 0, 1.0, scale)), 0, qmax)
        return scale, zp, np.zeros_like(scale)
    if zero == ZeroPoint.NONE:  # the block's largest magnitude lands on code 0, -2^(bits-1): the scale takes its sign
        # (as llama.cpp's Q4_0 does), so that level is not wasted: 2^(bits-1) steps on that side, one fewer on the other.
        # Stored in float16, as GGUF's Q4_0 stores it (the native kernel's records hold float16; a Q4_0 GGUF's blocks
        # come back exactly): rounded here so the codes are chosen against the stored values
        peak = np.where(-lo > hi, lo, hi)
        scale = (-peak * shrink / half).astype(np.float16).astype(np.float64)
        return scale, np.full(scale.shape, float(half)), np.zeros_like(scale)
    mid = (lo + hi) / 2
    lo, hi = mid - (mid - lo) * shrink, mid + (hi - mid) * shrink
    scale = (hi - lo) / qmax
    # stored in float16 (as GGUF's Q4_1 does): round here so the codes are chosen against the stored values
    scale = scale.astype(np.float16).astype(np.float64)
    offset = (lo + half * scale).astype(np.float16).astype(np.float64)
    return scale, np.full(scale.shape, float(half)), offset


def block_codes(v: np.ndarray, scale, zp, offset, bits: int) -> np.ndarray:
    safe = np.where(scale == 0, 1.0, scale)
    return np.clip(np.rint((v - offset[..., None]) / safe[..., None]) + zp[..., None], 0, 2**bits - 1)


def _assemble(q, scale, zp, offset, bits, block, k, zero) -> QTensor:
    n, nb = scale.shape
    return QTensor(
        codes=pack(q.reshape(n, nb, block).astype(np.uint8), bits),
        scales=scale.astype(np.float16 if zero == ZeroPoint.FLOAT else np.float32),
        zero_points=pack(zp.astype(np.uint8), bits, pad=2 ** (bits - 1)) if zero == ZeroPoint.INT else None,  # ORT pads with the mid-point
        bits=bits,
        block=block,
        k=k,
        offsets=offset.astype(np.float16) if zero == ZeroPoint.FLOAT else None,
    )


def quantize(w: np.ndarray, bits: int = 4, block: int = 32, zero: ZeroPoint = ZeroPoint.INT, algo: QuantAlgo = QuantAlgo.SEARCH,
             pool: Executor | None = None) -> QTensor:  # fmt: skip
    """Quantize ``w`` (N, K) float, block by block (``rtn`` or ``search``); codes in MatMulNBits layout. ``pool``
    searches chunks of rows side by side (rows are independent: the same result)."""
    check_params(bits, block)
    zero, algo = ZeroPoint.parse(zero, "zero point kind"), QuantAlgo.parse(algo, "block quantization algorithm")
    if algo is QuantAlgo.GPTQ:
        raise InputError(f"unknown block quantization algorithm {algo!r}; use 'search' or 'rtn'")
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {w.shape}")
    grid = SHRINK_GRID if algo is QuantAlgo.SEARCH else (1.0,)
    rows = max(1, SEARCH_ELEMENTS // w.shape[1])
    parts = list((pool.map if pool else map)(lambda i: _search(_blocks(np.asarray(w[i : i + rows], dtype=np.float64), block),
                                                               bits, zero, grid), range(0, w.shape[0], rows)))  # fmt: skip
    q, scale, zp, offset = (np.concatenate(p) for p in zip(*parts))
    return _assemble(q, scale, zp, offset, bits, block, w.shape[1], zero)


def _search(v: np.ndarray, bits: int, zero: ZeroPoint, grid) -> tuple[np.ndarray, ...]:
    """(codes, scale, zp, offset) of blocks ``v`` (rows, nb, block) at the shrink of ``grid`` with the least squared
    error per block (the first such shrink on a tie). Every shrink at once, along a leading axis: the same arithmetic,
    element by element, as one shrink at a time, in a few calls instead of a few per shrink."""
    shrinks = np.asarray(grid, np.float64).reshape(-1, 1, 1)  # (G, 1, 1)
    scale, zp, offset = block_params(v[None], bits, zero, shrinks)  # (G, rows, nb)
    q = block_codes(v[None], scale, zp, offset, bits)  # (G, rows, nb, block)
    err = ((((q - zp[..., None]) * scale[..., None] + offset[..., None]) - v[None]) ** 2).sum(-1)  # (G, rows, nb)
    best = shrinks[:, 0, 0][np.argmin(err, axis=0)]  # (rows, nb)
    scale, zp, offset = block_params(v, bits, zero, best)
    return block_codes(v, scale, zp, offset, bits), scale, zp, offset


def gptq_factor(hessian: np.ndarray, block: int, damp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """(the upper Cholesky factor of the damped, block-padded H^-1, the inputs never seen): what GPTQ needs of a
    Hessian, computed once for the projections that share their input (q/k/v, gate/up)."""
    k = hessian.shape[0]
    kp = -(-k // block) * block
    H = np.zeros((kp, kp), np.float64)
    H[:k, :k] = hessian
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    H[np.diag_indices(kp)] += damp * np.mean(np.diag(H))
    return _upper_cholesky_of_inverse(H), dead


def _upper_cholesky_of_inverse(H: np.ndarray) -> np.ndarray:
    """U upper triangular with U^T U = H^-1, without forming H^-1: with J the reversal, J H J = L L^T gives
    H^-1 = (J L^-1 J)^T (J L^-1 J), and J L^-1 J is upper triangular. One Cholesky and one triangular inverse
    instead of a general inverse and a Cholesky: 2.5x faster on the 1536-wide MLP-down Hessians. torch, because
    numpy has no triangular inverse (the calibration that made H has loaded it)."""
    import torch

    rev = torch.from_numpy(np.ascontiguousarray(H[::-1, ::-1]))
    L, info = torch.linalg.cholesky_ex(rev)
    if info.item():
        raise InputError("GPTQ: the calibration Hessian is not positive definite; give a longer calibration text")
    eye = torch.eye(len(H), dtype=L.dtype)
    return np.ascontiguousarray(torch.linalg.solve_triangular(L, eye, upper=False).numpy()[::-1, ::-1])


def gptq(w: np.ndarray, hessian: np.ndarray, bits: int = 4, block: int = 32, zero: ZeroPoint = ZeroPoint.INT, damp: float = 0.01,
         factor: tuple[np.ndarray, np.ndarray] | None = None) -> QTensor:  # fmt: skip
    """GPTQ (Frantar et al. 2022): quantize K-columns in order, pushing each column's error onto the
    columns not yet quantized through the inverse Hessian of the layer's inputs, H = X^T X.

    Each block's parameters are chosen (by ``search``) when the walk reaches the block, from the
    already error-compensated weights, so the result is an ordinary block-quantized tensor.
    """
    check_params(bits, block)
    n, k = w.shape
    nb = -(-k // block)
    kp = nb * block
    hinv, dead = factor if factor is not None else gptq_factor(hessian, block, damp)
    W = np.zeros((n, kp), np.float64)
    W[:, :k] = w
    W[:, dead] = 0.0
    q = np.zeros((n, kp))
    scale, zp, offset = (np.zeros((n, nb)) for _ in range(3))
    # Errors reach the rest of the quantization block column by column (outer products) and the columns after it
    # once per block (one matrix product): GPTQ's lazy batch updates at the block's width, 1.2-1.7x faster than
    # 128-column batches, whose column-by-column updates span four blocks.
    step = block
    for i1 in range(0, kp, step):
        i2 = min(i1 + step, kp)
        W1 = W[:, i1:i2].copy()
        err1 = np.zeros_like(W1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            b = (i1 + i) // block
            if (i1 + i) % block == 0:
                qt = quantize(W1[:, i : i + block], bits, block, zero, "search")
                scale[:, b], zp[:, b], offset[:, b] = _params_of(qt)
            col = block_codes(W1[:, i : i + 1], scale[:, b], zp[:, b], offset[:, b], bits)[:, 0]
            q[:, i1 + i] = col
            e = (W1[:, i] - ((col - zp[:, b]) * scale[:, b] + offset[:, b])) / h1[i, i]
            W1[:, i:] -= np.outer(e, h1[i, i:])
            err1[:, i] = e
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return _assemble(q, scale, zp, offset, bits, block, k, zero)


def _params_of(qt: QTensor):
    """(scale, zp, offset) of a single-block QTensor, as float64 vectors."""
    scale = qt.scales[:, 0].astype(np.float64)
    if qt.zero_points is not None:
        zp = unpack(qt.zero_points, qt.bits, 1)[:, 0].astype(np.float64)
    else:
        zp = np.full(scale.shape, float(2 ** (qt.bits - 1)))
    offset = qt.offsets[:, 0].astype(np.float64) if qt.offsets is not None else np.zeros_like(scale)
    return scale, zp, offset


def pack(q: np.ndarray, bits: int, pad: int = 0) -> np.ndarray:
    """Pack codes along the last axis: at 4 bits two per byte, low nibble first (odd length padded with ``pad``)."""
    if bits == 8:
        return np.ascontiguousarray(q, dtype=np.uint8)
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.full(q.shape[:-1] + (1,), pad, np.uint8)], axis=-1)
    return np.ascontiguousarray(q[..., 0::2] | (q[..., 1::2] << 4), dtype=np.uint8)


def unpack(p: np.ndarray, bits: int, length: int) -> np.ndarray:
    if bits == 8:
        return p[..., :length].astype(np.int32)
    out = np.stack([p & 0x0F, p >> 4], axis=-1).reshape(p.shape[:-1] + (p.shape[-1] * 2,))
    return out[..., :length].astype(np.int32)


def dequantize(qt: QTensor) -> np.ndarray:
    """The numpy reference: W_hat (N, K) float32, computed as the graph computes it."""
    nb = qt.n_blocks
    q = unpack(qt.codes, qt.bits, qt.block)  # (N, nb, block)
    zp = np.full((qt.n, nb), 2 ** (qt.bits - 1)) if qt.zero_points is None else unpack(qt.zero_points, qt.bits, nb)
    w = (q - zp[..., None]).astype(np.float32) * qt.scales.astype(np.float32)[..., None]
    if qt.offsets is not None:
        w = w + qt.offsets.astype(np.float32)[..., None]
    return w.reshape(qt.n, nb * qt.block)[:, : qt.k]


Q4_GROUP, Q4_BLOCK = 16, 32  # pack_q4's layout: output columns per group, K per block
Q8_BLOCK = 32


def quantize_q8_0(w: np.ndarray) -> QTensor:
    """llama.cpp's Q8_0: blocks of 32 along K, d = max|v| / 127 stored in float16, codes rint(v / d) in [-127, 127],
    kept in MatMulNBits' 8-bit layout (code + 128, its implied zero point 128) with the float16 scales: what the
    native kernel's MatMulQ8 reads where it lies, and what the graph gathers embedding rows from. A Q8_0 GGUF table
    (SmolLM2's token embedding) comes back exactly."""
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {w.shape}")
    v = _blocks(np.asarray(w, dtype=np.float32), Q8_BLOCK)  # (N, nb, 32)
    d = (np.abs(v).max(-1).astype(np.float64) / 127).astype(np.float16)
    inv = np.where(d == 0, 0.0, 1.0 / np.where(d == 0, 1.0, d.astype(np.float64))).astype(np.float32)
    codes = np.clip(np.rint(v * inv[..., None]), -127, 127) + 128
    return QTensor(codes=codes.astype(np.uint8), scales=d, zero_points=None, bits=8, block=Q8_BLOCK, k=w.shape[1])


def packs_q8(qt: QTensor) -> bool:
    """Whether the native kernel's MatMulQ8 runs ``qt``: a Q8_0 table (quantize_q8_0)."""
    return (qt.bits == 8 and qt.block == Q8_BLOCK and qt.zero_points is None and qt.offsets is None
            and qt.scales.dtype == np.float16)


def packs_q4(qt: QTensor) -> bool:
    """Whether the native kernel's MatMulQ4 runs ``qt``: 4 bits, blocks of 32, with float offsets (the int4 recipe)
    or symmetric (zero "none", llama.cpp's Q4_0)."""
    return qt.bits == 4 and qt.block == Q4_BLOCK and qt.zero_points is None


def pack_q4(qt: QTensor) -> np.ndarray:
    """``qt`` in the layout of the native kernel's MatMulQ4 (native/src/matmul_q4.h): (G, nb, 320) uint8, G = ceil(N / 16),
    or (G, nb, 288) for symmetric blocks (no offsets).

    Per group of 16 output columns and block of 32 along K, one contiguous record: 256 bytes of codes, then the
    16 columns' float16 scales and (with float offsets) float16 offsets. The codes are 4 vectors of 64 bytes; in vector v, byte
    4 j + i holds column j's code at k = 8 v + i (low nibble) and k = 8 v + 4 + i (high nibble), so that a
    32-bit lane of a vector register holds 4 consecutive codes of one column. Padding columns are zero."""
    if not packs_q4(qt):
        raise ValueError("pack_q4 takes 4-bit blocks of 32 with float offsets or none")
    n, nb = qt.n, qt.n_blocks
    groups = -(-n // Q4_GROUP)
    pad = groups * Q4_GROUP - n
    q = unpack(qt.codes, 4, Q4_BLOCK).astype(np.uint8)  # (N, nb, 32)
    params = [qt.scales.astype(np.float16)] + ([qt.offsets.astype(np.float16)] if qt.offsets is not None else [])
    if pad:
        q = np.pad(q, ((0, pad), (0, 0), (0, 0)))
        params = [np.pad(a, ((0, pad), (0, 0))) for a in params]
    q = q.reshape(groups, Q4_GROUP, nb, 4, 2, 4)  # (g, j, b, v, nibble, i): k = 8 v + 4 nibble + i
    q = q.transpose(0, 2, 3, 1, 5, 4)  # (g, b, v, j, i, nibble)
    codes = (q[..., 0] | (q[..., 1] << 4)).reshape(groups, nb, 256)

    def per_block(a: np.ndarray) -> np.ndarray:  # (N, nb) float16 -> (g, nb, 32) bytes
        return a.reshape(groups, Q4_GROUP, nb).transpose(0, 2, 1).copy().view(np.uint8)

    return np.ascontiguousarray(np.concatenate([codes, *map(per_block, params)], axis=-1))


# -- applying a recipe to a model's weights --------------------------------------------------
def _linear_type(m: str, qcfg) -> WeightType:
    if module_matches(qcfg.float_modules, m):
        return WeightType.FP32
    if m == "lm_head" and qcfg.embeddings is None and qcfg.weights.bits:
        return WeightType.INT8  # the output head is as sensitive as the embedding it often shares
    if qcfg.weights is WeightType.INT4 and module_matches(qcfg.int8_modules, m):
        return WeightType.INT8
    return qcfg.weights


def quantize_weights(weights: dict, linear_modules, qcfg, progress=lambda m: None, hessians: dict | None = None,
                     step=lambda done, total: None, q8_tables: bool = False) -> tuple[dict, dict, dict]:  # fmt: skip
    """Return (weights with QTensor / float16 values per the recipe, tensors per weight type, bytes per part).

    Only base weights are touched: the linear layers and the token embedding (a tied lm_head uses
    the embedding's codes). Norm weights stay float32; LoRA A/B never pass through here. ``q8_tables``: the int8
    embedding and lm_head as Q8_0 tables (quantize_q8_0), for the native kernel's MatMulQ8.
    """

    out = dict(weights)
    counts: dict[str, int] = {}
    sizes = {"embeddings": 0, "linear": 0, "other": 0}

    def encode(key: str, wtype: WeightType, factor=None, pool=None):
        w = weights[key]
        if not wtype.bits:
            return w.astype(np.float16) if wtype is WeightType.FP16 else w
        if q8_tables and wtype is WeightType.INT8 and key in (emb, "lm_head.weight"):
            return quantize_q8_0(w)
        zero = qcfg.zero_for(wtype)
        if factor is not None:
            return gptq(w, hessians[key[: -len(".weight")]], wtype.bits, qcfg.block, zero, factor=factor)
        algo = QuantAlgo.SEARCH if qcfg.algo is QuantAlgo.GPTQ else qcfg.algo
        return quantize(w, wtype.bits, qcfg.block, zero, algo, pool)

    def store(key: str, wtype: WeightType, part: str, value) -> None:
        out[key] = value
        sizes[part] += value.nbytes if isinstance(value, QTensor) else weights[key].size * (2 if wtype is WeightType.FP16 else 4)
        counts[wtype.value] = counts.get(wtype.value, 0) + 1

    emb = "model.embed_tokens.weight"
    if emb in weights:  # (encoders keep their embeddings in float32)
        progress(f"quantizing the embedding to {qcfg.embedding_type.value}")
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # the largest tensor: its rows side by side
            store(emb, qcfg.embedding_type, "embeddings", encode(emb, qcfg.embedding_type, pool=pool))
    mods = [m for m in linear_modules if f"{m}.weight" in weights]
    types = {m: _linear_type(m, qcfg) for m in mods}
    progress(f"quantizing {len(mods)} linear layers to {qcfg.weights.value} (block {qcfg.block}, {qcfg.algo})")
    def uses_gptq(m: str) -> bool:
        return qcfg.algo is QuantAlgo.GPTQ and types[m].bits == 4 and hessians is not None and m in hessians

    groups: dict[int, list[str]] = {}  # projections of one input share their Hessian object: factored once
    for m in mods:
        groups.setdefault(id(hessians[m]) if uses_gptq(m) else id(m), []).append(m)

    def run(group: list[str]) -> list:
        factor = gptq_factor(hessians[group[0]], qcfg.block) if uses_gptq(group[0]) else None
        return [encode(f"{m}.weight", types[m], factor) for m in group]

    # The layers are independent, and numpy gives up the GIL in its loops: a group per core at a time. Each result
    # is the one computed alone; they are stored in the modules' order, whatever finished first.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        jobs = [(group, pool.submit(run, group)) for group in groups.values()]
        done = 0
        for job in as_completed([j for _, j in jobs]):
            done += len(next(g for g, j in jobs if j is job))
            step(done, len(mods))
        for group, job in jobs:
            for m, value in zip(group, job.result()):
                store(f"{m}.weight", types[m], "linear", value)
    for key, w in weights.items():
        if key != emb and not any(key == f"{m}.weight" for m in mods):
            sizes["other"] += w.size * 4
    return out, counts, sizes
