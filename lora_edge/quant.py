"""Block-wise weight-only quantization in ONNX Runtime's MatMulNBits layout (compile side, numpy).

A weight W of shape (N, K) (HF layout: out_features x in_features) is cut along K into blocks of
``block`` values; each block stores ``bits``-bit codes q, one float scale and one integer zero point:

    W_hat[n, k] = (q[n, k] - zp[n, k // block]) * scale[n, k // block]

| bits | codes per byte | bytes per block of 32 (codes + fp32 scale + zp) | bits per weight |
|------|----------------|--------------------------------------------------|-----------------|
| 4    | 2 (low nibble first) | 16 + 4 + 0.5                               | 5.125           |
| 8    | 1              | 32 + 4 + 1                                       | 9.25            |

Layout (what MatMulNBits reads): codes (N, n_blocks, block*bits/8) uint8; scales (N, n_blocks)
float32; zero points (N, ceil(n_blocks*bits/8)) uint8, two per byte at 4 bits. Symmetric blocks
omit the zero points (the kernel then uses 2^(bits-1)). K is zero-padded up to a whole block.

Algorithms (one small function each):
- ``rtn``: round-to-nearest over [min(0, lo), max(0, hi)] of each block (ONNX Runtime's own RTN).
- ``search``: the same grid, but the clipping range of every block is chosen among shrink factors
  to minimise the block's squared error (as llama.cpp's k-quants do). Integer zero points, so it
  runs on the fast integer kernel, unlike HQQ's float zero points.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError

SHRINK_GRID = tuple(np.round(np.linspace(1.0, 0.6, 17), 4))


@dataclass(frozen=True)
class QTensor:
    """A quantized (N, K) weight in MatMulNBits layout."""

    codes: np.ndarray  # (N, n_blocks, block*bits/8) uint8
    scales: np.ndarray  # (N, n_blocks) float32
    zero_points: np.ndarray | None  # (N, ceil(n_blocks*bits/8)) uint8, None when symmetric
    bits: int
    block: int
    k: int  # the true K (before padding)

    @property
    def n(self) -> int:
        return self.codes.shape[0]

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes + (0 if self.zero_points is None else self.zero_points.nbytes)


def check_params(bits: int, block: int) -> None:
    if bits not in (4, 8):
        raise InputError(f"bits must be 4 or 8, got {bits}")
    if block < 16 or block > 256 or block & (block - 1):
        raise InputError(f"block size must be a power of two from 16 to 256, got {block}")


def _blocks(w: np.ndarray, block: int) -> np.ndarray:
    """(N, K) -> (N, n_blocks, block), zero-padded along K."""
    n, k = w.shape
    nb = -(-k // block)
    if nb * block != k:
        w = np.pad(w, ((0, 0), (0, nb * block - k)))
    return w.reshape(n, nb, block)


def _codes_for(v: np.ndarray, lo: np.ndarray, hi: np.ndarray, qmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer codes, scales, zero points for blocks ``v`` (..., block) over ranges [lo, hi] (lo <= 0 <= hi)."""
    scale = (hi - lo) / qmax
    safe = np.where(scale == 0, 1.0, scale)
    zp = np.clip(np.rint(-lo / safe), 0, qmax)
    q = np.clip(np.rint(v / safe[..., None]) + zp[..., None], 0, qmax)
    return q, scale, zp


def _codes_symmetric(v: np.ndarray, amax: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    half = 2 ** (bits - 1)
    scale = amax / half
    safe = np.where(scale == 0, 1.0, scale)
    q = np.clip(np.rint(v / safe[..., None]) + half, 0, 2 * half - 1)
    return q, scale, np.full(scale.shape, half, dtype=np.float64)


def quantize(w: np.ndarray, bits: int = 4, block: int = 32, symmetric: bool = False, algo: str = "search") -> QTensor:
    """Quantize ``w`` (N, K) float; returns codes in MatMulNBits layout."""
    check_params(bits, block)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {w.shape}")
    qmax = 2**bits - 1
    v = _blocks(np.asarray(w, dtype=np.float64), block)  # (N, nb, block)
    lo, hi = np.minimum(v.min(-1), 0.0), np.maximum(v.max(-1), 0.0)
    amax = np.maximum(-lo, hi)
    grid = SHRINK_GRID if algo == "search" else (1.0,)
    if algo not in ("search", "rtn"):
        raise InputError(f"unknown quantization algorithm {algo!r}; use 'search' or 'rtn'")
    best = None
    for r in grid:
        q, scale, zp = _codes_symmetric(v, amax * r, bits) if symmetric else _codes_for(v, lo * r, hi * r, qmax)
        err = (((q - zp[..., None]) * scale[..., None] - v) ** 2).sum(-1)  # (N, nb)
        if best is None:
            best = [q, scale, zp, err]
        else:
            better = err < best[3]
            best[0] = np.where(better[..., None], q, best[0])
            best[1] = np.where(better, scale, best[1])
            best[2] = np.where(better, zp, best[2])
            best[3] = np.where(better, err, best[3])
    q, scale, zp, _ = best
    return QTensor(
        codes=pack(q.astype(np.uint8), bits),
        scales=scale.astype(np.float32),
        zero_points=None if symmetric else pack(zp.astype(np.uint8), bits, pad=2 ** (bits - 1)),  # ORT pads with the mid-point
        bits=bits,
        block=block,
        k=w.shape[1],
    )


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
    """The numpy reference: W_hat (N, K) float32."""
    nb = qt.scales.shape[1]
    q = unpack(qt.codes, qt.bits, qt.block)  # (N, nb, block)
    zp = np.full((qt.n, nb), 2 ** (qt.bits - 1)) if qt.zero_points is None else unpack(qt.zero_points, qt.bits, nb)
    w = (q - zp[..., None]).astype(np.float32) * qt.scales[..., None]
    return w.reshape(qt.n, nb * qt.block)[:, : qt.k]


# -- applying a recipe to a model's weights --------------------------------------------------
def quantize_weights(weights: dict, linear_modules, qcfg, progress=lambda m: None) -> tuple[dict, dict]:
    """Return (weights with QTensor / float16 values per the recipe, a report for the manifest).

    Only base weights are touched: the linear layers and the token embedding (a tied lm_head uses
    the embedding's codes). Norm weights stay float32; LoRA A/B never pass through here.
    """
    from .config import WeightType, module_matches

    out = dict(weights)
    counts: dict[str, int] = {}
    sizes = {"embeddings": 0, "linear": 0, "other": 0}

    def store(key: str, wtype: WeightType, part: str) -> None:
        w = weights[key]
        if wtype.bits:
            qt = quantize(w, wtype.bits, qcfg.block_size, qcfg.symmetric, qcfg.algo)
            out[key] = qt
            sizes[part] += qt.nbytes
        elif wtype is WeightType.FP16:
            out[key] = w.astype(np.float16)
            sizes[part] += w.size * 2
        else:
            sizes[part] += w.size * 4
        counts[wtype.value] = counts.get(wtype.value, 0) + 1

    emb = "model.embed_tokens.weight"
    progress(f"quantizing the embedding to {qcfg.embedding_type.value}")
    store(emb, qcfg.embedding_type, "embeddings")
    mods = [m for m in linear_modules if f"{m}.weight" in weights]
    progress(f"quantizing {len(mods)} linear layers to {qcfg.weights.value} (block {qcfg.block_size}, {qcfg.algo})")
    for m in mods:
        if module_matches(qcfg.float_modules, m):
            wtype = WeightType.FP32
        elif m == "lm_head" and qcfg.embeddings is None and qcfg.weights.bits:
            wtype = WeightType.INT8  # the output head is as sensitive as the embedding it often shares
        elif qcfg.weights is WeightType.INT4 and module_matches(qcfg.int8_modules, m):
            wtype = WeightType.INT8
        else:
            wtype = qcfg.weights
        store(f"{m}.weight", wtype, "linear")
    for key, w in weights.items():
        if key != emb and not any(key == f"{m}.weight" for m in mods):
            sizes["other"] += w.size * 4
    return out, {**qcfg.to_json(), "tensors": counts, "bytes": sizes}
