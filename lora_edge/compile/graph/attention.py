"""Causal self-attention over the KV cache, in two forms: ONNX Runtime's fused operators (RotaryEmbedding,
GroupQueryAttention; unpadded batches) and standard ONNX ops (any execution provider, padded batches). Each
writes its per-call values (rotary tables, mask) once when built, then one layer's attention per call, which
also writes the layer's ``present.{i}.key/value`` outputs (batch, kv_heads, total_sequence_length, head_dim)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from onnx import TensorProto

from ..models.spec import DecoderSpec
from .activation import softcap
from .builder import GraphBuilder


class DecoderInputs(NamedTuple):
    input_ids: str  # (B, S)
    attention_mask: str  # (B, T), T = past + S
    position_ids: str  # (B, S)
    past: list[tuple[str, str]]  # per layer (key, value), (B, KV, P, D)


def split_heads(g: GraphBuilder, x: str, n: int, head_dim: int) -> str:  # (B, S, n*D) -> (B, n, S, D)
    return g.op("Transpose", [g.op("Reshape", [x, g.const([0, 0, n, head_dim])])], perm=[0, 2, 1, 3])


def merge_heads(g: GraphBuilder, ctx: str, width: int) -> str:  # (B, n, S, D) -> (B, S, n*D)
    return g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]), g.const([0, 0, width])])


def _scale(spec: DecoderSpec) -> float:
    return spec.attn_scale if spec.attn_scale is not None else spec.head_dim**-0.5


class FusedAttention:
    def __init__(self, g: GraphBuilder, spec: DecoderSpec, inv_freq: np.ndarray, inputs: DecoderInputs, ct) -> None:
        self.g, self.spec, self.inputs = g, spec, inputs
        if spec.positions == "rope":
            self.rows, self.cos, self.sin = self._rotary(g, spec, inv_freq, inputs.position_ids, ct)
        with g.scoped("mask"):  # GroupQueryAttention's: the keys per sequence less one, and the total length
            mask = inputs.attention_mask
            keys = g.op("ReduceSum", [mask, g.const([1])], keepdims=0)  # (B,)
            self.seqlens_k = g.op("Cast", [g.op("Sub", [keys, g.const(1)])], to=6)  # (B,) int32
            self.total_len = g.op("Cast", [g.op("Gather", [g.op("Shape", [mask]), g.const(1)], axis=0)], to=6)  # scalar int32

    @staticmethod
    def _rotary(g: GraphBuilder, spec: DecoderSpec, inv_freq: np.ndarray, position_ids: str, ct) -> tuple[str, str, str]:
        """RotaryEmbedding's inputs for this call's positions: cos and sin as a (B*S, D/2) table, and the (B, S)
        rows that index it. A (max_positions, D/2) table in the weights would be 2 MiB for SmolLM2's 8192 positions,
        resident once any row of it is read (page-cache folios are mapped whole); this is B*S rows of work a call."""
        f32 = np.float32
        with g.scoped("rotary"):
            pos = g.op("Cast", [g.op("Reshape", [position_ids, g.const([-1, 1])])], to=1)  # (B*S, 1)
            angles = g.op("Mul", [pos, g.weight("rotary.inv_freq", inv_freq.astype(f32)[None, :])])  # (B*S, D/2), as HF
            tables = [g.op("Cos", [angles]), g.op("Sin", [angles])]
            if spec.rope_attention_scaling != 1.0:
                tables = [g.op("Mul", [t, g.const(spec.rope_attention_scaling, f32)]) for t in tables]
            if ct is not f32:
                tables = [g.op("Cast", [t], to=TensorProto.FLOAT16) for t in tables]
            count = g.op("Size", [position_ids])  # B*S
            rows = g.op("Reshape", [g.op("Range", [g.const(0), count, g.const(1)]), g.op("Shape", [position_ids])])
            return rows, tables[0], tables[1]

    def __call__(self, i: int, q: str, k: str, v: str) -> str:
        """q (B, S, H*D), k and v (B, S, KV*D) -> (B, S, H*D)."""
        g, spec, H, KV = self.g, self.spec, self.spec.num_heads, self.spec.num_kv_heads
        if spec.positions == "rope":
            rotary = [self.rows, self.cos, self.sin]
            q = g.op("RotaryEmbedding", [q, *rotary], domain="com.microsoft", num_heads=H, interleaved=0)
            k = g.op("RotaryEmbedding", [k, *rotary], domain="com.microsoft", num_heads=KV, interleaved=0)
        past_k, past_v = self.inputs.past[i]
        out, *_ = g.op("GroupQueryAttention", [q, k, v, past_k, past_v, self.seqlens_k, self.total_len], domain="com.microsoft",
                       outs=[None, f"present.{i}.key", f"present.{i}.value"], num_heads=H, kv_num_heads=KV, scale=_scale(spec),
                       **({"softcap": spec.attn_softcap} if spec.attn_softcap else {}))  # fmt: skip
        return out


class ReferenceAttention:
    def __init__(self, g: GraphBuilder, spec: DecoderSpec, inv_freq: np.ndarray, inputs: DecoderInputs) -> None:
        self.g, self.spec, self.inputs = g, spec, inputs
        f32 = np.float32
        if spec.positions == "rope":  # cos and sin of this call's positions
            with g.scoped("rotary"):
                pos = g.op("Unsqueeze", [g.op("Cast", [inputs.position_ids], to=1), g.const([-1])])  # (B, S, 1)
                freqs = g.op("Mul", [pos, g.weight("rotary.inv_freq", inv_freq.astype(f32))])  # (B, S, D/2)
                emb = g.op("Concat", [freqs, freqs], axis=-1)  # (B, S, D)
                cos, sin = g.op("Cos", [emb]), g.op("Sin", [emb])
                if spec.rope_attention_scaling != 1.0:
                    scale = g.const(spec.rope_attention_scaling, f32)
                    cos, sin = g.op("Mul", [cos, scale]), g.op("Mul", [sin, scale])
                self.cos = g.op("Unsqueeze", [cos, g.const([1])])  # (B, 1, S, D)
                self.sin = g.op("Unsqueeze", [sin, g.const([1])])
        with g.scoped("mask"):  # 0 where key j is visible from query i (j <= P + i, not padding), else the float minimum
            seq_len = g.op("Gather", [g.op("Shape", [inputs.input_ids]), g.const(1)], axis=0)  # S
            total = g.op("Gather", [g.op("Shape", [inputs.attention_mask]), g.const(1)], axis=0)  # T
            past_len = g.op("Sub", [total, seq_len])  # P
            q_pos = g.op("Unsqueeze", [g.op("Range", [past_len, total, g.const(1)]), g.const([1])])  # (S, 1)
            k_pos = g.op("Unsqueeze", [g.op("Range", [g.const(0), total, g.const(1)]), g.const([0])])  # (1, T)
            causal = g.op("Not", [g.op("Greater", [k_pos, q_pos])])  # (S, T)
            padding = g.op("Unsqueeze", [g.op("Cast", [inputs.attention_mask], to=9), g.const([1, 2])])  # (B, 1, 1, T)
            allowed = g.op("And", [causal, padding])  # (B, 1, S, T)
            self.bias = g.op("Where", [allowed, g.const(0.0, f32), g.const(np.finfo(f32).min, f32)])

    def __call__(self, i: int, q: str, k: str, v: str) -> str:
        """q (B, S, H*D), k and v (B, S, KV*D) -> (B, S, H*D)."""
        g, spec, H, D = self.g, self.spec, self.spec.num_heads, self.spec.head_dim
        KV = spec.num_kv_heads
        q, k, v = split_heads(g, q, H, D), split_heads(g, k, KV, D), split_heads(g, v, KV, D)  # (B, n, S, D)
        if spec.positions == "rope":
            q, k = self._rotate(q), self._rotate(k)
        past_k, past_v = self.inputs.past[i]
        k_all = g.op("Concat", [past_k, k], axis=2, out=f"present.{i}.key")  # (B, KV, T, D)
        v_all = g.op("Concat", [past_v, v], axis=2, out=f"present.{i}.value")
        scores = g.op("MatMul", [q, g.op("Transpose", [self._repeat_kv(k_all)], perm=[0, 1, 3, 2])])  # (B, H, S, T)
        scores = g.op("Mul", [scores, g.const(_scale(spec), np.float32)])
        if spec.attn_softcap:
            scores = softcap(g, scores, spec.attn_softcap, np.float32)
        scores = g.op("Add", [scores, self.bias])
        ctx = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), self._repeat_kv(v_all)])  # (B, H, S, D)
        return merge_heads(g, ctx, H * D)  # (B, S, H*D)

    def _rotate(self, x: str) -> str:  # x*cos + rotate_half(x)*sin, rotate_half = cat(-x2, x1)
        g = self.g
        x1, x2 = g.op("Split", [x], n_out=2, axis=-1)
        rot = g.op("Concat", [g.op("Neg", [x2]), x1], axis=-1)
        return g.op("Add", [g.op("Mul", [x, self.cos]), g.op("Mul", [rot, self.sin])])

    def _repeat_kv(self, x: str) -> str:  # (B, KV, T, D) -> (B, H, T, D): each KV head serves H/KV query heads
        g, H, KV = self.g, self.spec.num_heads, self.spec.num_kv_heads
        if H == KV:
            return x
        x5 = g.op("Unsqueeze", [x, g.const([2])])  # (B, KV, 1, T, D)
        shape = g.op("Shape", [x5])
        target = g.op("Concat", [g.op("Slice", [shape, g.const([0]), g.const([2])]), g.const([H // KV]),
                                 g.op("Slice", [shape, g.const([3]), g.const([5])])], axis=0)  # fmt: skip
        return g.op("Reshape", [g.op("Expand", [x5, target]), g.const([0, H, -1, self.spec.head_dim])])  # (B, H, T, D)
