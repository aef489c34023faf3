"""What the native LoRA kernel costs per decode token, to a tenth of a millisecond: a synthetic decoder.

    python benchmarks/branch_micro.py                                  # the built kernel, 1 and 2 threads
    python benchmarks/branch_micro.py --kernel OLD.so --kernel NEW.so  # two kernel builds side by side
    python benchmarks/branch_micro.py --offsets                        # int4 float offsets: standard ops or the kernel

`branch_cost.py` measures the real model, where the machine's drift (+-5% over a minute) hides a
0.1 ms change in the branch. This builds SmolLM2-135M's 30 layers of projections only: each base
projection an int4 MatMulNBits (block 32, accuracy level 4, random codes: ~55 MB streamed per token,
so the adapter is evicted from the caches between tokens as in real decoding), each followed by the
kernel's node for r16all (rank 16 on q/k/v as one node, o, gate/up as one node, down) adding its delta
onto the base. Every configuration is a session in one process, sharing one thread pool (separate
pools spin against each other on two cores), run in turn, 4 runs at a time, round after round; the
table reports each one's extra time over the base-only graph (median of per-round differences).

Rows: "no adapter" (rank 0: the node's own cost), "float16" and "int8" (A/B storage), per kernel.

It assumes a last-level cache well under the base's 55 MB. On a host whose share of a large L3 holds
most of it (2026-12-03: a 2-vCPU slice of an AVX-512 Xeon with 480 MB of L3, pointer-chase latency 55 ns
at 32 MB and 130 ns at 64 MB), the adapter's few MB push the synthetic base out of cache: ORT's profiler put
MatMulNBits at 11.3 ms per token alone and 14.8 ms with the float16 adapter's nodes between, and a
kernel variant that only read A and B (no arithmetic) took it to 21 ms. The extra time then belongs to
the base, not the branch, and this benchmark overstates the branch several times over (+5-7 ms per token
against +1.2 ms on the real model, whose 115 MB per token stream from memory anyway). Use
`branch_cost.py` there.

`--offsets`: the default int4's float block offsets too (float16, one per block of 32), over the same
integer-only base: their correction as the standard graph runs it (Reshape + ReduceSum per input, a
float32 MatMul and an Add per projection; with an adapter the kernel's node adds the correction as its
`extra`) and on the kernel (v3: a BlockOffset node, or the branch's own node taking the offsets), each
merged (no adapter) and with r16all in int8 A/B.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import numpy as np

LAYERS, HIDDEN, KV, FFN, RANK = 30, 576, 192, 1536, 16  # SmolLM2-135M; r16all


def build_graph(rank: int | None, dtype: str, rng: np.random.Generator, offsets: str | None = None, packed: bool = False):
    """The synthetic decoder: base projections only (rank None) or with the kernel's nodes; its feeds.
    ``offsets``: float block offsets on every projection, corrected by standard ops ("onnx") or the kernel ("kernel").
    ``packed``: each base projection is the kernel's MatMulQ4 (v4), and a branch's node takes its packed weight
    (one node per projection and adapter, as `--lora-kernel native` int4 packages run)."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, feeds = [], [], {}
    blob_parts: list = []
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, HIDDEN])]
    sums: dict[str, str] = {}

    def packed_weight(name: str, k: int, n: int) -> str:
        groups, nb = -(-n // 16), k // 32
        codes = rng.integers(0, 256, (groups, nb, 256), dtype=np.uint8)
        scales, offs = ((rng.random((2, groups, nb, 16)) * 2e-3).astype(np.float16).view(np.uint8).reshape(2, groups, nb, 32))
        inits.append(numpy_helper.from_array(np.concatenate([codes, scales, offs], axis=-1), f"{name}.q4x"))
        return f"{name}.q4x"

    def base(name: str, x: str, k: int, n: int) -> str:
        if packed and rank is None:
            nodes.append(helper.make_node("MatMulQ4", [x, packed_weight(name, k, n)], [f"{name}.y"], domain="lora_edge", K=k, N=n))
            return f"{name}.y"
        if packed:
            return ""  # the branch's node runs the projection
        codes = rng.integers(0, 256, (n, k // 32, 16), dtype=np.uint8)
        scales = (rng.random(n * k // 32, dtype=np.float32) * 2e-3).astype(np.float32)
        inits.extend([numpy_helper.from_array(codes, f"{name}.q"), numpy_helper.from_array(scales, f"{name}.s")])
        nodes.append(helper.make_node("MatMulNBits", [x, f"{name}.q", f"{name}.s"], [f"{name}.y"], domain="com.microsoft",
                                      K=k, N=n, bits=4, block_size=32, accuracy_level=4))  # fmt: skip
        return f"{name}.y"

    def offset_terms(name: str, x: str, k: int, n: int) -> tuple[list[str], list[str]]:
        """(extra addends for the standard graph, the kernel's trailing inputs) of the offsets' correction."""
        if offsets is None:
            return [], []
        off = (rng.standard_normal((k // 32, n)) * 1e-3).astype(np.float16)
        if offsets == "kernel":
            inits.append(numpy_helper.from_array(off, f"{name}.off"))
            return [], [f"{name}.off"]
        inits.append(numpy_helper.from_array(off.astype(np.float32), f"{name}.off"))
        if x not in sums:
            inits.append(numpy_helper.from_array(np.array([0, k // 32, 32], np.int64), f"{x}.blocks"))
            nodes.append(helper.make_node("Reshape", [x, f"{x}.blocks"], [f"{x}.r"]))
            nodes.append(helper.make_node("ReduceSum", [f"{x}.r", "last"], [f"{x}.sums"], keepdims=0))
            sums[x] = f"{x}.sums"
        nodes.append(helper.make_node("MatMul", [sums[x], f"{name}.off"], [f"{name}.corr"]))
        return [f"{name}.corr"], []

    def linear(name: str, x: str, k: int, n: int, chunk: int, chunk_modules: list[int]) -> str:
        y = base(name, x, k, n)
        extra, kernel_offsets = offset_terms(name, x, k, n)
        if rank is None and extra:
            nodes.append(helper.make_node("Add", [y, *extra], [f"{name}.sum"]))
            return f"{name}.sum"
        if rank is None and kernel_offsets:
            nodes.append(helper.make_node("BlockOffset", [x, *kernel_offsets, y], [f"{name}.sum"], domain="lora_edge", block=32))
            return f"{name}.sum"
        if rank is None:
            return y
        modules = max(chunk_modules) + 1
        a = rng.standard_normal((k, modules * rank)).astype(np.float32) * 0.05
        b = rng.standard_normal((len(chunk_modules), rank, chunk)).astype(np.float32) * 0.05
        if dtype == "int8":
            from lora_edge.native.encode import quantize_int8

            (qa, sa), (qb, sb) = quantize_int8(a, 0), quantize_int8(b, -1)
            named = {"A": qa, "A_scale": sa, "B": qb, "B_scale": sb}
        elif dtype == "w8a8":  # its part of one blob input for every branch, as w8a8 packages bind it
            blob_parts.append(((len(chunk_modules), chunk), (a, b)))
            named = {}
        else:
            named = {"A": a.astype(np.float16), "B": b.astype(np.float16)}
        for key, v in named.items():
            feeds[f"{name}.{key}"] = v
            inputs.append(helper.make_tensor_value_info(f"{name}.{key}", helper.np_dtype_to_tensor_dtype(v.dtype), None))
        ab = ["lora.w8a8", "", "", ""] if dtype == "w8a8" else [f"{name}.{key}" for key in named]
        op = "LoraDeltaQ8" if dtype in ("int8", "w8a8") else "LoraDelta"
        trailing = [*extra, *([""] + kernel_offsets if kernel_offsets else [])]  # base, extra, offsets
        if packed:
            trailing = ["", "", packed_weight(name, k, n)]  # extra, offsets, packed
        attrs = {"offset_block": 32} if kernel_offsets else {}
        if dtype == "w8a8":
            attrs["slot"] = len(blob_parts) - 1
        nodes.append(helper.make_node(op, [x, *ab, y, *trailing], [f"{name}.out"],
                                      domain="lora_edge", chunk_modules=chunk_modules, **attrs))  # fmt: skip
        return f"{name}.out"

    def first(y: str, n: int, out: str) -> str:
        nodes.append(helper.make_node("Slice", [y, "zero", f"width{n}", "last"], [out]))
        return out

    x = "x"
    for i in range(LAYERS):
        q = first(linear(f"qkv{i}", x, HIDDEN, HIDDEN + 2 * KV, KV, [0, 0, 0, 1, 2]), HIDDEN, f"q{i}")
        o = linear(f"o{i}", q, HIDDEN, HIDDEN, HIDDEN, [0])
        g = first(linear(f"gate_up{i}", o, HIDDEN, 2 * FFN, FFN, [0, 1]), FFN, f"g{i}")
        nodes.append(helper.make_node("Tanh", [linear(f"down{i}", g, FFN, HIDDEN, HIDDEN, [0])], [f"h{i}"]))
        x = f"h{i}"
    if blob_parts:
        from lora_edge.native.encode import w8a8_blob

        feeds["lora.w8a8"] = w8a8_blob(blob_parts)
        inputs.append(helper.make_tensor_value_info("lora.w8a8", TensorProto.INT8, None))
    for name, v in {"zero": 0, "last": -1, f"width{HIDDEN}": HIDDEN, f"width{FFN}": FFN}.items():
        inits.append(numpy_helper.from_array(np.array([v], np.int64), name))
    graph = helper.make_graph(nodes, "decoder", inputs, [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1), helper.make_opsetid("lora_edge", 1)]
    return helper.make_model(graph, opset_imports=opsets), feeds


OFFSET_CONFIGS = {"offsets (onnx)": (None, "onnx"), "offsets (kernel)": (None, "kernel"),
                  "int8 + offsets (onnx)": (RANK, "onnx"), "int8 + offsets (kernel)": (RANK, "kernel")}  # fmt: skip


def child(threads: int, kernels: list[str], rounds: int, offsets: bool = False, packed: bool = False) -> None:
    import onnxruntime as ort
    from onnxruntime.capi import onnxruntime_pybind11_state as C

    C.set_global_thread_pool_sizes(threads, 1)
    rng = np.random.default_rng(0)
    configs = {"base": (None, "float16", kernels[0], None)}
    for j, lib in enumerate(kernels):
        tag = f" [{j}]" if len(kernels) > 1 else ""
        if offsets:
            configs.update({f"{k}{tag}": (rank, "int8", lib, how) for k, (rank, how) in OFFSET_CONFIGS.items()})
            continue
        configs.update({f"no adapter{tag}": (0, "float16", lib, None), f"float16{tag}": (RANK, "float16", lib, None),
                        f"int8{tag}": (RANK, "int8", lib, None), **({f"w8a8{tag}": (RANK, "w8a8", lib, None)} if packed else {})})  # fmt: skip
    runs = {}
    x = rng.standard_normal((1, HIDDEN)).astype(np.float32)
    for label, (rank, dtype, lib, how) in configs.items():
        model, feeds = build_graph(rank, dtype, rng, how, packed)
        so = ort.SessionOptions()
        so.use_per_session_threads = False
        so.register_custom_ops_library(lib)
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        io = sess.io_binding()
        io.bind_cpu_input("x", x)
        for k, v in feeds.items():
            io.bind_cpu_input(k, v)
        io.bind_output(sess.get_outputs()[0].name)
        runs[label] = (sess, io)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for label, (sess, io) in runs.items():
            for _ in range(3):  # the pool's threads settle on this session
                sess.run_with_iobinding(io)
            t0 = time.perf_counter()
            for _ in range(4):
                sess.run_with_iobinding(io)
            times[label].append((time.perf_counter() - t0) / 4 * 1e3)
    base = times.pop("base")
    cells = [f"{statistics.median(base):.2f}"]
    for label, ts in times.items():
        extra = statistics.median([t - b for t, b in zip(ts, base)])
        cells.append(f"+{extra:.3f} ms ({extra / statistics.median(base) * 100:+.1f}%)")
    print(f"| {threads} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernel", action="append", help="a kernel library (repeat to compare builds; default: the built one)")
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--offsets", action="store_true", help="int4 float offsets: their correction by standard ops or the kernel")
    ap.add_argument("--packed", action="store_true", help="kernel v4: MatMulQ4 bases, each branch's node running its projection")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    kernels = args.kernel
    if not kernels:
        from lora_edge.native import build as build_native

        kernels = [str(build_native())]
    if args.child:
        child(args.child, kernels, args.rounds, args.offsets, args.packed)
        return
    tags = [f" [{j}]" if len(kernels) > 1 else "" for j in range(len(kernels))]
    for j, k in enumerate(kernels):
        if len(kernels) > 1:
            print(f"[{j}] {k}")
    names = ("no adapter", "float16", "int8") + (("w8a8",) if args.packed else ())
    cols = [c + t for t in tags for c in (OFFSET_CONFIGS if args.offsets else names)]
    print(f"\nsynthetic SmolLM2-135M projections, r16all; {args.rounds} rounds; extra time per token over the base\n")
    print("| threads | base ms/token | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for threads in args.threads:  # one process per thread count: the shared pool's size is fixed per process
        cmd = [sys.executable, __file__, "--child", str(threads), "--rounds", str(args.rounds)] + (["--offsets"] if args.offsets else []) + (["--packed"] if args.packed else [])
        subprocess.run(cmd + [a for k in kernels for a in ("--kernel", k)], check=True, env=os.environ)


if __name__ == "__main__":
    main()
