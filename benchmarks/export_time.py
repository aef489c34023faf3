"""Export time of the real model: loading its GGUF, and the int4 + GPTQ (portable recipe) and int8 exports
with the two example adapters, each stage timed, each run in a fresh process (imports included, as the CLI
pays them).

    .venv/bin/python benchmarks/export_time.py [--quant int4 --quant int8] [--threads N] [--out DIR]

A stage's time runs from its progress line to the next one; on a machine shared with other work the
totals move with the load, the breakdown shows which stage moved.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# progress line prefix -> stage name, in pipeline order
STAGES = (("loading base model", "load GGUF"), ("reading adapter", "read adapters"), ("calibrating GPTQ", "calibrate (GPTQ)"),
          ("quantizing the embedding", "quantize embedding"), ("quantizing ", "quantize linear layers"),
          ("building graph", "build graph"), ("writing model.onnx", "write model.onnx"), ("writing adapters", "write adapters"),
          ("writing manifest", "manifest + sha256 + rename"))  # fmt: skip


def child(job: str, out: Path) -> dict:
    """Runs in the fresh process: one job, its stage times as JSON."""
    start = time.perf_counter()
    from lora_edge.compile.realmodel import smollm2_gguf

    marks: list[tuple[float, str]] = []
    if job == "load":
        from lora_edge.compile.models.loader import load_base

        load_base(smollm2_gguf())
        return {"total": time.perf_counter() - start, "stages": {"load GGUF (with imports)": time.perf_counter() - start}}
    from lora_edge.compile.pipeline import export
    from lora_edge.config import AdapterSpec
    from lora_edge.recipes import export_config

    adapters = tuple(AdapterSpec(n, ROOT / "examples" / "adapters" / n) for n in ("pirate", "shout"))
    cfg = export_config("portable", quant={"weights": job}, base=smollm2_gguf(), output=out, adapters=adapters, force=True)
    marks.append((time.perf_counter(), "imports"))
    export(cfg, progress=lambda msg: marks.append((time.perf_counter(), msg)))
    marks.append((time.perf_counter(), "end"))
    stages: dict[str, float] = {"imports": marks[1][0] - start if len(marks) > 1 else 0.0}
    for (t, msg), (t_next, _) in zip(marks[1:], marks[2:]):
        name = next((s for prefix, s in STAGES if msg.startswith(prefix)), msg)
        stages[name] = stages.get(name, 0.0) + t_next - t
    return {"total": time.perf_counter() - start, "stages": stages}


def run(job: str, out: Path, threads: int | None) -> dict:
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    r = subprocess.run([sys.executable, __file__, "--child", job, "--out", str(out)], env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{job} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quant", action="append", choices=("int4", "int8"), help="exports to time (default: int4 and int8)")
    ap.add_argument("--threads", type=int, default=None, help="OMP/OpenBLAS/MKL threads of each run (default: theirs)")
    ap.add_argument("--out", type=Path, default=None, help="where the packages go (default: a temporary directory)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.out)))
        return
    out = args.out or Path(tempfile.mkdtemp(prefix="export_time_"))
    out.mkdir(parents=True, exist_ok=True)
    jobs = ["load"] + (args.quant or ["int4", "int8"])
    results = {j: run(j, out / j, args.threads) for j in jobs}
    names = list(dict.fromkeys(s for r in results.values() for s in r["stages"]))
    print(f"$ {Path(sys.executable).name} benchmarks/export_time.py" + "".join(f" --quant {q}" for q in args.quant or [])
          + (f" --threads {args.threads}" if args.threads else "") + f"    ({os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f})")  # fmt: skip
    print(f"{'stage':<28}" + "".join(f"{j:>10}" for j in jobs))
    for n in names:
        print(f"{n:<28}" + "".join(f"{results[j]['stages'][n]:>9.1f}s" if n in results[j]["stages"] else f"{'':>10}" for j in jobs))
    print(f"{'total':<28}" + "".join(f"{results[j]['total']:>9.1f}s" for j in jobs))


if __name__ == "__main__":
    main()
