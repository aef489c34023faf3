"""Export: base + adapters -> package (compile side).

The flow, one stage per line, is in :func:`export`. Only the base weights go into model.onnx;
each adapter goes into its own ``adapters/NAME.onnx_adapter`` whose tensors are named after the
graph inputs they override (``<module>.lora_A`` / ``<module>.lora_B``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from . import __version__
from .adapters import EMBEDDING, Adapter, check_adapter_files, read_adapter
from .config import ExportConfig, Mode, WeightType
from .errors import InputError
from .models import Slot, family_for
from .models.ops import blob_geometry, blob_slots
from .models.spec import BaseModel
from .native import W8A8_BLOB
from .package import check_output, staged_output, write_manifest
from .quant import quantize_weights
from .targets import Target, to_ort_format, write_genai_config

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ExportResult:
    path: Path
    manifest: dict


def plan_slots(base: BaseModel, adapters: list[Adapter], family, fused: bool) -> dict[str, Slot]:
    """One slot per group of linear layers (q/k/v, gate/up, or one module) that any adapter targets."""
    biased = {m for a in adapters for m in a.bias_deltas}
    replaced = {m for a in adapters for m in a.replacements}
    wanted = {m for a in adapters for m in a.modules} | biased | replaced
    dora = {m for a in adapters for m, lora in a.modules.items() if lora.dora_scale is not None}
    lin = base.linear_modules
    slots = {
        name: Slot(name, lin[modules[0]].in_features, tuple((m, lin[m].out_features) for m in modules), dora=bool(dora & set(modules)),
                   bias=bool(biased & set(modules)), replace=modules == (name,) and name in replaced)  # fmt: skip
        for name, modules in family.groups(base.spec, fused)
        if wanted & set(modules)
    }
    if EMBEDDING in wanted:  # embedding LoRA: A is a (vocab, r) table gathered by token id, B is (r, dim)
        slots = {EMBEDDING: Slot(EMBEDDING, base.spec.vocab_size, ((EMBEDDING, base.spec.hidden_size),)), **slots}
    return slots


def merged_weights(base: BaseModel, adapter: Adapter) -> dict[str, np.ndarray]:
    """W + s*B*A (DoRA: g * (W + s*B*A)) in float32 for every adapted module (PEFT's merge_and_unload)."""
    weights = dict(base.weights)
    for module, delta in adapter.bias_deltas.items():
        weights[f"{module}.bias"] = (weights[f"{module}.bias"] + delta).astype(np.float32)
    for module, parts in adapter.replacements.items():  # modules_to_save: the adapter's own copy
        for part, arr in parts.items():
            weights[f"{module}.{part}"] = arr
    for module, lora in adapter.modules.items():
        key = f"{module}.weight"
        if key not in weights and module == "lm_head":  # tied head: merging unties it
            weights[key] = base.weight_of(module)
        if module == EMBEDDING and base.spec.tie_word_embeddings and "lm_head.weight" not in weights:
            weights["lm_head.weight"] = weights[key]  # the head keeps the embedding it had: untie (PEFT's merge would not)
        weights[key] = lora.merged(weights[key])
    return weights


def adapter_tensors(adapter: Adapter, slots: dict[str, Slot]) -> dict[str, np.ndarray]:
    """The adapter as graph inputs: per slot, its modules' A side by side and their B chunked or block-diagonal.

    A module of the group that this adapter does not target contributes no rank (its columns of B
    stay zero); a slot none of whose modules it targets is not bound at all (the default is zero)."""
    out = {}
    for slot in slots.values():
        if slot.replace and slot.name in adapter.replacements:
            parts = adapter.replacements[slot.name]
            out[slot.weight_name] = np.ascontiguousarray(parts["weight"].T, np.float32)
            if "bias" in parts:
                out[slot.replaced_bias_name] = parts["bias"]
        if slot.bias and any(m in adapter.bias_deltas for m in slot.modules):
            out[slot.bias_name] = np.concatenate([adapter.bias_deltas.get(m, np.zeros(o, np.float32)) for m, o in slot.parts])
        mods = [(m, adapter.modules[m]) for m in slot.modules if m in adapter.modules]
        if not mods:
            continue
        if slot.chunk_width:
            out[slot.a_name], out[slot.b_name] = _chunked(slot, dict(mods))
        else:
            out[slot.a_name], out[slot.b_name] = _block_diagonal(slot, mods)
        if slot.dora and any(lora.dora_scale is not None for _, lora in mods):  # DoRA scales; ones for plain LoRA parts
            out[slot.m_name] = np.concatenate([
                adapter.modules[m].dora_scale if m in adapter.modules and adapter.modules[m].dora_scale is not None
                else np.ones(o, np.float32) for m, o in slot.parts])  # fmt: skip
    return out


def _block_diagonal(slot: Slot, mods: list) -> tuple[np.ndarray, np.ndarray]:
    """A: the targeted modules' A side by side (in, r); B: their B block-diagonal (r, sum(out))."""
    r = sum(lora.rank for _, lora in mods)
    a = np.concatenate([lora.a for _, lora in mods], axis=1)  # (in, r)
    b = np.zeros((r, slot.out_features), np.float32)  # (r, sum(out))
    offsets = dict(zip(slot.modules, np.cumsum([0] + [o for _, o in slot.parts])))
    row = 0
    for m, lora in mods:
        b[row : row + lora.rank, offsets[m] : offsets[m] + lora.b.shape[1]] = lora.b
        row += lora.rank
    return np.ascontiguousarray(a, np.float32), b


def _chunked(slot: Slot, mods: dict) -> tuple[np.ndarray, np.ndarray]:
    """A: every module's A side by side at one rank r_m (in, n*r_m), zero columns where the adapter ranks
    a module lower or skips it; B: (chunks, r_m, c), chunk j the columns of its module's B it produces."""
    r = max(lora.rank for lora in mods.values())
    c = slot.chunk_width
    a = np.zeros((slot.in_features, len(slot.parts) * r), np.float32)  # (in, n*r_m)
    b = np.zeros((len(slot.chunk_modules), r, c), np.float32)  # (chunks, r_m, c)
    first = 0  # the first chunk of module i
    for i, (m, out) in enumerate(slot.parts):
        lora = mods.get(m)
        if lora is not None:
            a[:, i * r : i * r + lora.rank] = lora.a
            for j in range(out // c):  # (r, out) -> its chunks of c columns
                b[first + j, : lora.rank] = lora.b[:, j * c : (j + 1) * c]
        first += out // c
    return a, b


def balanced(adapter: Adapter) -> Adapter:
    """The same adapter with each rank's A column and B row scaled to equal peaks (A s, B / s: the same
    product), so that float16 storage keeps both in its normal range: a trained B is often ~1e-4, near
    float16's smallest normal (6e-5), while A is ~1e-2."""
    mods = {}
    for name, m in adapter.modules.items():
        if m.embedding:
            mods[name] = m
            continue
        pa, pb = np.abs(m.a).max(axis=0), np.abs(m.b).max(axis=1)  # (r,), (r,)
        s = np.where((pa > 0) & (pb > 0), np.sqrt(pb / np.where(pa > 0, pa, 1)), 1.0).astype(np.float32)
        mods[name] = replace(m, a=(m.a * s[None, :]).astype(np.float32), b=(m.b / s[:, None]).astype(np.float32))
    return replace(adapter, modules=mods)


def write_adapter_file(path: Path, adapter: Adapter, slots: dict[str, Slot], model_version: int, dtype=np.float32,
                       lora_dtype: str | None = None, blob: tuple = ()) -> None:  # fmt: skip
    """``dtype``: of every tensor; ``lora_dtype``: how the native kernel stores lora_A / lora_B ("float16",
    "int8" with scales, "w8a8" the same in the q8x order, the ``blob``'s (lora_A, lora_B, chunks, c) in one
    tensor; see lora_edge.native.encode), None for ``dtype`` like the rest."""
    import onnxruntime as ort

    from .native import encode

    tensors = adapter_tensors(balanced(adapter) if lora_dtype else adapter, slots)
    pairs = [(s.a_name, s.b_name) for s in slots.values() if s.name != EMBEDDING]  # (embedding LoRA stays in dtype)
    ab = {n for pair in pairs for n in pair}
    tensors = {name: t if lora_dtype and name in ab else t.astype(dtype) for name, t in tensors.items()}
    if lora_dtype:
        tensors = encode(tensors, pairs, lora_dtype, blob)
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(model_version)
    # (kept alive: OrtValues borrow numpy memory)
    fmt.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(tensors[name]) for name in sorted(tensors)})
    fmt.export_adapter(str(path))


def _graph_io(model) -> dict:
    def dims(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    names = {i.name for i in model.graph.initializer}
    return {
        "inputs": [{"name": i.name, "shape": dims(i)} for i in model.graph.input if i.name not in names],
        "outputs": [{"name": o.name, "shape": dims(o)} for o in model.graph.output],
    }


def calibrate(base: BaseModel, hf_model, q, progress: Progress) -> dict:
    """GPTQ's input statistics from the float model on the calibration text."""
    from tokenizers import Tokenizer

    from .calibrate import collect_hessians, default_calibration_text

    if "tokenizer.json" not in base.tokenizer_files:
        if q.calibration is not None:
            raise InputError("GPTQ needs the base's tokenizer.json to read the calibration text; use --quant-algo search")
        progress("no tokenizer.json: GPTQ falls back to the data-free 'search' algorithm")
        return None
    text = q.calibration.read_text(encoding="utf-8") if q.calibration else default_calibration_text()
    ids = Tokenizer.from_str(base.tokenizer_files["tokenizer.json"].decode()).encode(text, add_special_tokens=False).ids
    progress(f"calibrating GPTQ on {len(ids)} tokens")
    by_peft = {lm.peft: lm.path for lm in base.linear_modules.values()}  # hooks go on the PyTorch model's modules
    chunk = min(512, base.spec.max_position_embeddings)
    return {by_peft[m]: h for m, h in collect_hessians(hf_model, ids, list(by_peft), chunk=chunk).items()}


def export(cfg: ExportConfig, progress: Progress = lambda msg: None) -> ExportResult:
    """Compile ``cfg.base`` and ``cfg.adapters`` into a package at ``cfg.output``."""
    import onnx

    from .models.loader import describe_base, load_base

    # Fail before the slow part on everything that can be checked without loading the model.
    check_output(cfg.output, cfg.force)
    describe_base(cfg.base)
    for spec in cfg.adapters:
        check_adapter_files(spec.name, spec.path)
    progress(f"loading base model {cfg.base}")
    base, hf_model = load_base(cfg.base)
    family = family_for(base.spec.architecture)
    adapters = []
    for spec in cfg.adapters:
        progress(f"reading adapter {spec.name} from {spec.path}")
        adapters.append(read_adapter(spec.name, spec.path, base))
    slots = plan_slots(base, adapters, family, cfg.fused) if cfg.mode is Mode.BRANCH else {}
    weights = merged_weights(base, adapters[0]) if cfg.mode is Mode.MERGE else base.weights  # merge in fp32, then quantize
    replaced = {s.name: base.weight_of(s.name) for s in slots.values() if s.replace}
    if replaced:  # a replaceable module's weight is an input with the base's (float) weight as default
        weights = {**weights, **{f"{m}.weight": w for m, w in replaced.items()}}
    q = cfg.quant
    if q.weights is not WeightType.FP32 or q.embedding_type is not WeightType.FP32:
        hessians = None
        if q.algo == "gptq" and q.weights is WeightType.INT4:
            hessians = calibrate(base, hf_model, q, progress)
        weights, qreport = quantize_weights(weights, base.linear_modules, q, progress, hessians)
        for m, w in replaced.items():  # a module adapters may replace stays float: its weight is an input
            weights[f"{m}.weight"] = w
    else:
        qreport = {**q.to_json(), "tensors": {"fp32": len(base.linear_modules) + 1}}
    progress(f"building graph: {base.spec.num_layers} layers, {len(slots)} LoRA branches")
    model = family.build_graph(base, weights, slots, cfg.opset, cfg.null_rank,
                                            store_fp16=q.weights is WeightType.FP16, accuracy_level=q.accuracy_level,
                                            fused=cfg.fused, compute_dtype=cfg.compute_dtype, lora_kernel=cfg.lora_kernel,
                                            lora_dtype=cfg.lora_dtype)  # fmt: skip
    if not cfg.fused:  # the checker does not know ONNX Runtime's contrib ops registered in the default domain
        onnx.checker.check_model(model, full_check=False)
    kernel_nodes = [n for n in model.graph.node if n.domain == "lora_edge"]
    packed_at = {"LoraDelta": 6, "LoraDeltaQ8": 8}  # the index of a branch node's optional `packed` input (v4)
    # v4: MatMulQ4 and the branches' packed input (the int4 base); v3: BlockOffset and LoraDelta's offsets;
    # a v2 kernel runs the rest
    # w8a8: the q8x branches' A, B and scales in one blob input, (lora_A, lora_B, chunks, c) per branch
    in_blob = blob_slots(slots, cfg.lora_kernel, cfg.lora_dtype)
    blob_parts = tuple((s.a_name, s.b_name, *blob_geometry(s)) for s in in_blob)
    # v5: LoraDeltaQ8 in the q8x order, from the w8a8 blob
    kernel_version = (5 if blob_parts else 4 if any(n.op_type == "MatMulQ4" or len(n.input) > packed_at.get(n.op_type, 99) for n in kernel_nodes) else
                      3 if any(n.op_type == "BlockOffset" or any(a.name == "offset_block" for a in n.attribute) for n in kernel_nodes)
                      else 2)  # fmt: skip

    with staged_output(cfg.output, cfg.force) as tmp:
        progress("writing model.onnx")
        io = _graph_io(model)
        onnx.save_model(model, str(tmp / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data", size_threshold=1024)  # fmt: skip
        del model
        if cfg.mode is Mode.BRANCH and adapters:
            (tmp / "adapters").mkdir()
            for a in adapters:
                progress(f"writing adapters/{a.name}.onnx_adapter")
                write_adapter_file(tmp / "adapters" / f"{a.name}.onnx_adapter", a, slots, base.identity, np.dtype(cfg.compute_dtype),
                                   lora_dtype=cfg.lora_dtype if cfg.lora_kernel == "native" else None, blob=blob_parts)  # fmt: skip
        graph_file = "model.onnx"
        if cfg.target == Target.MOBILE.value:
            progress("converting to ORT format (model.ort) and writing the operator config for a reduced build")
            to_ort_format(tmp / "model.onnx", tmp / "model.ort")
            (tmp / "model.onnx").unlink()
            (tmp / "model.onnx.data").unlink(missing_ok=True)
            graph_file = "model.ort"
        for fname, blob in sorted(base.tokenizer_files.items()):
            (tmp / fname).write_bytes(blob)
        (tmp / "config.json").write_text(json.dumps(base.hf_config, indent=2, sort_keys=True) + "\n")
        if cfg.fused and base.spec.kind == "decoder" and cfg.lora_kernel == "onnx":  # (GenAI cannot load lora_edge.LoraDelta)
            write_genai_config(tmp, base.spec.to_json(), base.hf_config, graph_file, cfg.target)
        int8_lora = cfg.lora_kernel == "native" and cfg.lora_dtype in ("int8", "w8a8")
        blob_of = {s.name: i for i, s in enumerate(in_blob)}
        kernel_entry = {"name": "native", "version": kernel_version, "dtype": cfg.lora_dtype}
        if blob_parts:  # the blob's input and its parts, (lora_A, lora_B, chunks, c) each, for whoever encodes adapters
            kernel_entry["blob"] = {"name": W8A8_BLOB, "slots": [list(b) for b in blob_parts]}
        manifest = {
            "lora_edge_version": __version__,
            "base": {
                "source": str(base.source),
                "sha256": base.sha256,
                "identity": base.identity,
                "spec": base.spec.to_json(),
            },
            "mode": cfg.mode.value,
            "quantization": qreport,
            "graph": {
                "file": graph_file,
                "target": cfg.target,
                "opset": cfg.opset,
                "compute_dtype": cfg.compute_dtype,
                "attention": "fused" if cfg.fused else "reference",
                "null_rank": cfg.null_rank,
                **({"lora_kernel": kernel_entry} if cfg.lora_kernel == "native" else {}),
                **io,
            },
            "slots": [
                {
                    "name": s.name,
                    "in_features": s.in_features,
                    "out_features": s.out_features,
                    "parts": [{"module": m, "out_features": o} for m, o in s.parts],
                    "lora_A": s.a_name,
                    "lora_B": s.b_name,
                    **(dict(zip(("lora_A_scale", "lora_B_scale"), s.scale_names))
                       if int8_lora and s.name != EMBEDDING and s.name not in blob_of else {}),  # fmt: skip
                    **({"lora_B_chunks": {"width": s.chunk_width, "modules": list(s.chunk_modules)}} if s.chunk_width else {}),
                    **({"lora_blob": blob_of[s.name]} if s.name in blob_of else {}),  # its part of the w8a8 blob
                    **({"lora_M": s.m_name} if s.dora else {}),
                    **({"lora_bias": s.bias_name} if s.bias else {}),
                    **({"weight": s.weight_name, "bias_in": s.replaced_bias_name} if s.replace else {}),
                    "adapters": [a.name for a in adapters if set(s.modules) & set(a.modules)],
                }
                for s in slots.values()
            ],
            "adapters": {
                a.name: {
                    **a.summary(),
                    "file": f"adapters/{a.name}.onnx_adapter" if cfg.mode is Mode.BRANCH else None,
                    "merged": cfg.mode is Mode.MERGE,
                }
                for a in adapters
            },
            "tokenizer": {"files": sorted(base.tokenizer_files)},
        }
        progress("writing manifest.json")
        manifest = write_manifest(tmp, manifest)
    return ExportResult(path=Path(cfg.output), manifest=manifest)
