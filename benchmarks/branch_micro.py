"""What the native LoRA kernel costs per decode token, to a tenth of a millisecond: a synthetic decoder.

    python benchmarks/branch_micro.py                                  # the built kernel, 1 and 2 threads
    python benchmarks/branch_micro.py --kernel OLD.so --kernel NEW.so  # two kernel builds side by side

`branch_cost.py` measures the real model, where the machine's drift (+-5% over a minute) hides a
0.1 ms change in the branch. This builds SmolLM2-135M's 30 layers of projections only: each base
projection an int4 MatMulNBits (block 32, accuracy level 4, random codes: ~55 MB streamed per token,
so the adapter is evicted from the caches between tokens as in real decoding), each followed by the
kernel's node for r16all (rank 16 on q/k/v as one node, o, gate/up as one node, down) adding its delta
onto the base. Every configuration is a session in one process, sharing one thread pool (separate
pools spin against each other on two cores), run in turn, 4 runs at a time, round after round; the
table reports each one's extra time over the base-only graph (median of per-round differences).

Rows: "no adapter" (rank 0: the node's own cost), "float16" and "int8" (A/B storage), per kernel.
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


def build_graph(rank: int | None, dtype: str, rng: np.random.Generator):
    """The synthetic decoder: base projections only (rank None) or with the kernel's nodes; its feeds."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, feeds = [], [], {}
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, HIDDEN])]

    def base(name: str, x: str, k: int, n: int) -> str:
        codes = rng.integers(0, 256, (n, k // 32, 16), dtype=np.uint8)
        scales = (rng.random(n * k // 32, dtype=np.float32) * 2e-3).astype(np.float32)
        inits.extend([numpy_helper.from_array(codes, f"{name}.q"), numpy_helper.from_array(scales, f"{name}.s")])
        nodes.append(helper.make_node("MatMulNBits", [x, f"{name}.q", f"{name}.s"], [f"{name}.y"], domain="com.microsoft",
                                      K=k, N=n, bits=4, block_size=32, accuracy_level=4))  # fmt: skip
        return f"{name}.y"

    def linear(name: str, x: str, k: int, n: int, chunk: int, chunk_modules: list[int]) -> str:
        y = base(name, x, k, n)
        if rank is None:
            return y
        modules = max(chunk_modules) + 1
        a = rng.standard_normal((k, modules * rank)).astype(np.float32) * 0.05
        b = rng.standard_normal((len(chunk_modules), rank, chunk)).astype(np.float32) * 0.05
        if dtype == "int8":
            from lora_edge.native import quantize_int8

            (qa, sa), (qb, sb) = quantize_int8(a, 0), quantize_int8(b, -1)
            named = {"A": qa, "A_scale": sa, "B": qb, "B_scale": sb}
        else:
            named = {"A": a.astype(np.float16), "B": b.astype(np.float16)}
        for key, v in named.items():
            feeds[f"{name}.{key}"] = v
            inputs.append(helper.make_tensor_value_info(f"{name}.{key}", helper.np_dtype_to_tensor_dtype(v.dtype), None))
        op = "LoraDeltaQ8" if dtype == "int8" else "LoraDelta"
        nodes.append(helper.make_node(op, [x, *(f"{name}.{key}" for key in named), y], [f"{name}.out"],
                                      domain="lora_edge", chunk_modules=chunk_modules))  # fmt: skip
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
    for name, v in {"zero": 0, "last": -1, f"width{HIDDEN}": HIDDEN, f"width{FFN}": FFN}.items():
        inits.append(numpy_helper.from_array(np.array([v], np.int64), name))
    graph = helper.make_graph(nodes, "decoder", inputs, [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1), helper.make_opsetid("lora_edge", 1)]
    return helper.make_model(graph, opset_imports=opsets), feeds


def child(threads: int, kernels: list[str], rounds: int) -> None:
    import onnxruntime as ort
    from onnxruntime.capi import onnxruntime_pybind11_state as C

    C.set_global_thread_pool_sizes(threads, 1)
    rng = np.random.default_rng(0)
    configs = {"base": (None, "float16", kernels[0])}
    for j, lib in enumerate(kernels):
        tag = f" [{j}]" if len(kernels) > 1 else ""
        configs.update({f"no adapter{tag}": (0, "float16", lib), f"float16{tag}": (RANK, "float16", lib),
                        f"int8{tag}": (RANK, "int8", lib)})  # fmt: skip
    runs = {}
    x = rng.standard_normal((1, HIDDEN)).astype(np.float32)
    for label, (rank, dtype, lib) in configs.items():
        model, feeds = build_graph(rank, dtype, rng)
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
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    kernels = args.kernel
    if not kernels:
        from lora_edge import native

        kernels = [str(native.build())]
    if args.child:
        child(args.child, kernels, args.rounds)
        return
    tags = [f" [{j}]" if len(kernels) > 1 else "" for j in range(len(kernels))]
    for j, k in enumerate(kernels):
        if len(kernels) > 1:
            print(f"[{j}] {k}")
    cols = [c + t for t in tags for c in ("no adapter", "float16", "int8")]
    print(f"\nsynthetic SmolLM2-135M projections, r16all; {args.rounds} rounds; extra time per token over the base\n")
    print("| threads | base ms/token | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for threads in args.threads:  # one process per thread count: the shared pool's size is fixed per process
        cmd = [sys.executable, __file__, "--child", str(threads), "--rounds", str(args.rounds)]
        subprocess.run(cmd + [a for k in kernels for a in ("--kernel", k)], check=True, env=os.environ)


if __name__ == "__main__":
    main()
