"""Describe a package (data) and render it (text). Device side."""

from __future__ import annotations

from pathlib import Path

from .package import read_manifest


def describe(path: Path) -> dict:
    m = read_manifest(Path(path), verify=False)
    files = m["files"]
    weights = sum(v["bytes"] for k, v in files.items() if k.startswith("model.onnx"))
    adapters = {}
    for name, a in sorted(m.get("adapters", {}).items()):
        adapters[name] = {**a, "bytes": files.get(a.get("file") or "", {}).get("bytes")}
    return {**m, "sizes": {"graph_and_weights": weights, "total": sum(v["bytes"] for v in files.values())}, "adapters": adapters}


def _quant_line(info: dict) -> str:
    q = info["quantization"]
    line = f"weights     {q['weights']}"
    if q["weights"] in ("int4", "int8"):
        line += f" (block {q['block_size']}, {q.get('zero')} zero points, {q['algo']}, accuracy level {q['accuracy_level']})"
    line += f", embeddings {q['embeddings']}; model files {_mib(info['sizes']['graph_and_weights'])}, package {_mib(info['sizes']['total'])}"
    parts = q.get("bytes")
    if parts:
        line += "\n  parts     " + ", ".join(f"{k} {_mib(v)}" for k, v in parts.items())
        line += "  (" + ", ".join(f"{n} {t}" for t, n in sorted(q["tensors"].items())) + " tensors)"
    return line


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.2f} MiB"


def render(info: dict) -> str:
    spec = info["base"]["spec"]
    g = info["graph"]
    lines = [
        f"package     lora-edge {info['lora_edge_version']} (schema {info['schema_version']}), mode {info['mode']}",
        f"base        {spec['architecture']} ({spec['family']}): {spec['num_layers']} layers, hidden {spec['hidden_size']}, "
        f"heads {spec['num_heads']}/{spec['num_kv_heads']} kv, vocab {spec['vocab_size']}, "
        f"{'tied' if spec['tie_word_embeddings'] else 'untied'} embeddings, context {spec['max_position_embeddings']}",
        f"source      {info['base']['source']}",
        f"base sha256 {info['base']['sha256'][:16]}...  (identity {info['base']['identity']})",
        _quant_line(info),
        f"graph       {g['file']}, opset {g['opset']}, no-adapter rank {g.get('null_rank')}, LoRA kernel "
        + (f"native v{g['lora_kernel']['version']} ({g['lora_kernel']['dtype']} A/B; needs `lora-edge build-kernel`)" if g.get("lora_kernel") else "onnx"),
    ]
    ins = [i for i in g["inputs"] if not i["name"].startswith("past_key_values.")]
    outs = [o for o in g["outputs"] if not o["name"].startswith("present.")]
    n_past = len(g["inputs"]) - len(ins)
    lines.append("  inputs    " + ", ".join(f"{i['name']}{i['shape']}" for i in ins) + f", past_key_values.*.key/value x{n_past}")
    lines.append("  outputs   " + ", ".join(f"{o['name']}{o['shape']}" for o in outs) + f", present.*.key/value x{len(g['outputs']) - len(outs)}")
    slots = info.get("slots", [])
    kinds: dict[str, int] = {}
    for s in slots:
        k = s["name"].rsplit(".", 1)[-1]
        kinds[k] = kinds.get(k, 0) + 1
    lines.append(f"slots       {len(slots)} LoRA branches" + (": " + ", ".join(f"{k} x{v}" for k, v in kinds.items()) if kinds else ""))
    if info["adapters"]:
        lines.append("adapters")
        head = f"  {'name':<14}{'rank':>6}{'alpha':>8}{'kind':>8}{'modules':>9}{'params':>11}{'size':>12}  targets"
        lines.append(head)
        for name, a in info["adapters"].items():
            ranks = "/".join(str(r) for r in a["ranks"])
            kind = "dora" if a.get("use_dora") else "rslora" if a["use_rslora"] else "lora"
            saves = f"; replaces {', '.join(a['modules_to_save'])}" if a.get("modules_to_save") else ""
            lines.append(
                f"  {name:<14}{ranks:>6}{a['lora_alpha']:>8g}{kind:>8}{a['modules']:>9}"
                f"{a['parameters']:>11,}{_mib(a['bytes']) if not a.get('merged') else 'merged':>12}  {', '.join(a['target_modules'])}{saves}"
            )
    else:
        lines.append("adapters    none")
    return "\n".join(lines)
