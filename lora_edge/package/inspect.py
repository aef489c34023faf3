"""Describe a package: what it holds (data, for --json) and the same as text. Device side."""

from __future__ import annotations

from pathlib import Path

from .manifest import Manifest, json_of
from .store import read_manifest


def describe(path: Path) -> Manifest:
    return read_manifest(Path(path), verify=False)


def describe_json(m: Manifest) -> dict:
    """The manifest as JSON plus the sizes inspect shows."""
    adapters = {n: {**json_of(a), "bytes": m.files[a.file].bytes if a.file in m.files else None} for n, a in sorted(m.adapters.items())}
    return {**m.to_json(), "sizes": {"graph_and_weights": m.size("model."), "total": m.size()}, "adapters": adapters}


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.2f} MiB"


def _quant_line(m: Manifest) -> str:
    q = m.quantization
    line = f"weights     {q.weights}"
    if q.weights.bits:
        line += f" (block {q.block_size}, {q.zero} zero points, {q.algo}, accuracy level {q.accuracy_level})"
    line += f", embeddings {q.embeddings}; model files {_mib(m.size('model.'))}, package {_mib(m.size())}"
    if q.bytes:
        line += "\n  parts     " + ", ".join(f"{k} {_mib(v)}" for k, v in q.bytes.items())
        line += "  (" + ", ".join(f"{n} {t}" for t, n in sorted(q.tensors.items())) + " tensors)"
    return line


def _kernel_line(m: Manifest) -> str:
    k = m.kernel
    if k is None:
        return "LoRA kernel onnx (standard ONNX ops: any onnxruntime)"
    features = ", ".join(k.features) or "recorded by version only"
    return f"LoRA kernel native v{k.version} ({k.dtype} A/B; features {features}; needs `lora-edge build-kernel`)"


def _io_lines(m: Manifest) -> list[str]:
    g = m.graph
    ins = [i for i in g.inputs if not i.name.startswith("past_key_values.")]
    outs = [o for o in g.outputs if not o.name.startswith("present.")]
    shape = lambda t: f"{t.name}{list(t.shape)}"  # noqa: E731
    return [
        "  inputs    " + ", ".join(map(shape, ins)) + f", past_key_values.*.key/value x{len(g.inputs) - len(ins)}",
        "  outputs   " + ", ".join(map(shape, outs)) + f", present.*.key/value x{len(g.outputs) - len(outs)}",
    ]


def adapter_lines(m: Manifest) -> list[str]:
    if not m.adapters:
        return ["adapters    none"]
    lines = ["adapters", f"  {'name':<14}{'rank':>6}{'alpha':>8}{'kind':>8}{'modules':>9}{'params':>11}{'size':>12}  targets"]
    for name, a in sorted(m.adapters.items()):
        ranks = "/".join(str(r) for r in a.ranks)
        size = "merged" if a.merged else _mib(m.files[a.file].bytes if a.file in m.files else None)
        saves = f"; replaces {', '.join(a.modules_to_save)}" if a.modules_to_save else ""
        lines.append(f"  {name:<14}{ranks:>6}{a.lora_alpha:>8g}{a.kind:>8}{a.modules:>9}{a.parameters:>11,}{size:>12}  "
                     f"{', '.join(a.target_modules)}{saves}")  # fmt: skip
    return lines


def render(m: Manifest) -> str:
    spec, g = m.spec, m.graph
    kinds: dict[str, int] = {}
    for s in m.slots:
        k = s.name.rsplit(".", 1)[-1]
        kinds[k] = kinds.get(k, 0) + 1
    return "\n".join([
        f"package     lora-edge {m.lora_edge_version} (schema {m.schema_version}), mode {m.mode}, recipe {m.recipe}",
        f"base        {spec.architecture} ({spec.family}): {spec.num_layers} layers, hidden {spec.hidden_size}, "
        f"heads {spec.num_heads}/{spec.num_kv_heads} kv, vocab {spec.vocab_size}, "
        f"{'tied' if spec.tie_word_embeddings else 'untied'} embeddings, context {spec.max_position_embeddings}",
        f"source      {m.base.source}",
        f"base sha256 {m.base.sha256[:16]}...  (identity {m.base.identity})",
        _quant_line(m),
        f"graph       {g.file} for {g.target}, opset {g.opset}, {g.attention} attention, no-adapter rank {g.null_rank}",
        f"kernel      {_kernel_line(m)}",
        *_io_lines(m),
        f"slots       {len(m.slots)} LoRA branches" + (": " + ", ".join(f"{k} x{v}" for k, v in kinds.items()) if kinds else ""),
        *adapter_lines(m),
    ])  # fmt: skip
