"""A small ONNX graph builder: named values in, named values out, deterministic node names.

The decoder graphs are written by hand (see models/llama.py) rather than traced, so every
tensor has the name we chose: weights keep their PEFT module paths and LoRA inputs are
``<module>.lora_A`` / ``<module>.lora_B``, never a name guessed back from an exporter.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ...native.contract import Feature

KERNEL_FEATURES_KEY = "lora_edge.kernel_features"  # the model's metadata entry listing them

_NP_TO_ONNX = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.bool_): TensorProto.BOOL,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.int8): TensorProto.INT8,
}


def onnx_dtype(dtype) -> int:
    return _NP_TO_ONNX[np.dtype(dtype)]


class GraphBuilder:
    """Collects nodes, initializers and I/O; ``model()`` returns a checked ModelProto."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, np.ndarray] = {}
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._counts: Counter[str] = Counter()
        self._consts: dict[tuple, str] = {}
        self.scope = ""
        self.kernel_features: set[Feature] = set()  # what the graph needs of lora-edge's native kernel

    @contextlib.contextmanager
    def scoped(self, scope: str) -> Iterator[None]:
        """Name the nodes added inside ``scope/...`` (node names show up in ONNX Runtime's profiles)."""
        prev, self.scope = self.scope, scope
        try:
            yield
        finally:
            self.scope = prev

    # -- values -------------------------------------------------------------------------------
    def _fresh(self, base: str) -> str:
        base = f"{self.scope}/{base}" if self.scope else base
        self._counts[base] += 1
        n = self._counts[base]
        return base if n == 1 else f"{base}_{n}"

    def input(self, name: str, dtype, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, onnx_dtype(dtype), shape))
        return name

    def output(self, value: str, name: str, dtype, shape: list) -> None:
        if value != name:
            self.op("Identity", [value], out=name)
        self.outputs.append(helper.make_tensor_value_info(name, onnx_dtype(dtype), shape))

    def weight(self, name: str, array: np.ndarray) -> str:
        """A named initializer (the name is part of the package's contract)."""
        if name in self.initializers:
            raise ValueError(f"initializer {name} defined twice")
        self.initializers[name] = np.ascontiguousarray(array)
        return name

    def const(self, value, dtype=np.int64) -> str:
        """A small constant, shared by value."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.weight(f"const.{len(self._consts)}", arr)
        return self._consts[key]

    # -- nodes --------------------------------------------------------------------------------
    def op(self, op_type: str, inputs: list[str], out: str | None = None, n_out: int = 1, domain: str = "",
           outs: list[str] | None = None, **attrs):  # fmt: skip
        """Add a node; returns its output name (or list of names). ``outs`` names them explicitly ("" = unused)."""
        op_type = str(op_type)  # (an operator name may come as lora_edge.native.contract.Op)
        name = self._fresh(op_type)
        if outs is not None:
            outs = [o if o is not None else f"{name}/out{i}" for i, o in enumerate(outs)]
            n_out = len(outs)
        else:
            outs = [out] if out else [f"{name}/out{i}" if n_out > 1 else f"{name}/out" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, domain=domain or None, **attrs))
        return outs[0] if n_out == 1 else outs

    def need(self, *features: Feature) -> None:
        """Record that a node just emitted uses these native-kernel features (the package's manifest lists them)."""
        self.kernel_features.update(features)

    # -- result -------------------------------------------------------------------------------
    def model(self, opset: int, overridable: dict[str, tuple[np.ndarray, list]] | None = None) -> onnx.ModelProto:
        """Build the ModelProto. ``overridable`` maps a graph input name to (default value, symbolic shape)."""
        inits = [numpy_helper.from_array(a, n) for n, a in self.initializers.items()]
        inputs = list(self.inputs)
        for name, (default, shape) in (overridable or {}).items():
            inputs.append(helper.make_tensor_value_info(name, onnx_dtype(default.dtype), shape))
            inits.append(numpy_helper.from_array(np.ascontiguousarray(default), name))
        graph = helper.make_graph(self.nodes, self.name, inputs, self.outputs, initializer=inits)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)]
            + [helper.make_opsetid(d, 1) for d in sorted({n.domain for n in self.nodes} - {"", "com.microsoft"})],
            producer_name="lora-edge",
        )
        model.ir_version = 8 if opset <= 17 else 9
        if self.kernel_features:
            helper.set_model_props(model, {KERNEL_FEATURES_KEY: ",".join(sorted(f.value for f in self.kernel_features))})
        return model


def kernel_features(model: onnx.ModelProto) -> tuple[Feature, ...]:
    """The native-kernel features the graph writer recorded in ``model`` (sorted; empty for standard ops only)."""
    props = {p.key: p.value for p in model.metadata_props}
    return tuple(Feature(f) for f in props.get(KERNEL_FEATURES_KEY, "").split(",") if f)
