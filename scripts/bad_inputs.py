"""Try every bad input we know of against the CLI and print what the user sees (a Markdown table).

    python scripts/bad_inputs.py          # ~1 minute; writes nothing outside a temporary directory
    python scripts/bad_inputs.py --json   # the rows as JSON (tests/test_bad_inputs.py runs this)

Each case must end with exit code 2, one line on stderr, no traceback and nothing written; the
script says so per row (the same cases are asserted in tests/test_cli.py, test_adapters.py,
test_package.py and test_fuzz.py). It needs the development install (pip install -e '.[dev]'): the
tiny models and adapters come from the test suite's tests/conftest.py.
"""

from __future__ import annotations

import contextlib
import json
import runpy
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_cases() -> list[dict]:
    """Run every case; one dict per case: label, exit code, last output line, whether anything was written."""
    from click.testing import CliRunner
    from safetensors.numpy import save_file

    from lora_edge.cli import cli
    from lora_edge.st_io import read_safetensors

    helpers = runpy.run_path(str(ROOT / "tests" / "conftest.py"))  # the suite's tiny-model builders, by file
    make_tiny_base, make_adapter = helpers["make_tiny_base"], helpers["make_adapter"]
    tmp = Path(tempfile.mkdtemp(prefix="lora-edge-bad-"))
    base = make_tiny_base(tmp / "base")
    other = make_tiny_base(tmp / "other", "mha_untied")
    good = make_adapter(base, tmp / "good")
    pkg = tmp / "pkg"
    runner = CliRunner()
    assert runner.invoke(cli, ["export", str(base), "-a", f"good={good}", "-o", str(pkg)]).exit_code == 0
    merged = tmp / "merged"
    assert runner.invoke(cli, ["export", str(base), "-a", f"good={good}", "-o", str(merged), "--mode", "merge"]).exit_code == 0

    def variant(name, edit):
        d = tmp / name
        shutil.copytree(good, d)
        edit(d)
        return d

    def config(**kw):
        def edit(d):
            c = json.loads((d / "adapter_config.json").read_text())
            c.update(kw)
            (d / "adapter_config.json").write_text(json.dumps(c))

        return edit

    def tensors(fn):
        def edit(d):
            f = d / "adapter_model.safetensors"
            save_file(fn(read_safetensors(f, ValueError)), str(f))

        return edit

    def nan(t):
        k = sorted(t)[0]
        t[k] = t[k].copy()
        t[k][0, 0] = float("nan")
        return t

    def tamper(p, rel):
        d = tmp / f"tampered-{rel.replace('/', '_')}"
        shutil.copytree(p, d)
        b = bytearray((d / rel).read_bytes())
        b[len(b) // 2] ^= 1
        (d / rel).write_bytes(bytes(b))
        return d

    newer = tmp / "newer"
    shutil.copytree(pkg, newer)
    m = json.loads((newer / "manifest.json").read_text())
    m["schema_version"] = 9
    (newer / "manifest.json").write_text(json.dumps(m))
    existing = tmp / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    out = str(tmp / "out")

    def with_adapter(path) -> list[str]:
        """``export BASE -a x=PATH -o OUT``: the shape of every adapter case."""
        return ["export", str(base), "-a", f"x={path}", "-o", out]

    cases = [
        ("missing base path", ["export", str(tmp / "nope"), "-o", out]),
        ("base is not a model directory", ["export", str(good), "-o", out]),
        ("base is a file but not GGUF", ["export", str(good / "adapter_config.json"), "-o", out]),
        ("missing adapter path", with_adapter(tmp / 'nope')),
        ("adapter dir is not an adapter", with_adapter(base)),
        ("adapter stored as pickle", with_adapter(variant('pickle', lambda d: (d / 'adapter_model.safetensors').rename(d / 'adapter_model.bin')))),
        ("truncated safetensors", with_adapter(variant('trunc', lambda d: (d / 'adapter_model.safetensors').write_bytes((d / 'adapter_model.safetensors').read_bytes()[:-64])))),
        ("corrupt safetensors", with_adapter(variant('corrupt', lambda d: (d / 'adapter_model.safetensors').write_bytes(b'garbage!' * 4)))),
        ("adapter_config.json not JSON", with_adapter(variant('badjson', lambda d: (d / 'adapter_config.json').write_text('{oops')))),
        ("adapter trained for another base", with_adapter(make_adapter(other, tmp / 'otherad'))),
        ("target module not in the base", with_adapter(variant('nomod', lambda d: (tensors(lambda t: {k.replace('layers.0.', 'layers.9.'): v for k, v in t.items()})(d), config(target_modules='.*')(d))))),
        ("use_dora set but no DoRA magnitudes", with_adapter(variant('dora', config(use_dora=True)))),
        ("modules_to_save listed but not in the file", with_adapter(variant('mts', config(modules_to_save=['lm_head'])))),
        ("unknown adapter_config field", with_adapter(variant('unk', config(new_peft_knob=2)))),
        ("config and weights disagree (rank)", with_adapter(variant('rank', config(r=5)))),
        ("NaN in adapter weights", with_adapter(variant('nan', tensors(nan)))),
        ("two adapters with one name", ["export", str(base), "-a", f"x={good}", "-a", f"x={good}", "-o", out]),
        ("adapter name not a safe file name", ["export", str(base), "-a", f"../x={good}", "-o", out]),
        ("merge with two adapters", ["export", str(base), "-a", f"x={good}", "-a", f"y={good}", "--mode", "merge", "-o", out]),
        ("output directory exists", ["export", str(base), "-o", str(existing)]),
        ("--force on a directory that is not a package", ["export", str(base), "-o", str(existing), "--force"]),
        ("output's parent missing", ["export", str(base), "-o", str(tmp / "a" / "b")]),
        ("block size not a power of two", ["export", str(base), "-o", out, "--quant", "int4", "--block-size", "48"]),
        ("block size out of range", ["export", str(base), "-o", out, "--quant", "int4", "--block-size", "512"]),
        ("null rank out of range", ["export", str(base), "-o", out, "--null-rank", "3"]),
        ("threads below 1", ["run", str(pkg), "--prompt", "hi", "--threads", "0"]),
        ("prompt longer than the context", ["run", str(pkg), "--prompt", "word " * 300]),
        ("unknown adapter at run time", ["run", str(pkg), "--prompt", "hi", "--adapter", "nope"]),
        ("execution provider not installed", ["run", str(pkg), "--prompt", "hi", "--provider", "CUDAExecutionProvider"]),
        ("package path missing", ["run", str(tmp / "nope"), "--prompt", "hi"]),
        ("not a package", ["inspect", str(base)]),
        ("tampered weights file", ["run", str(tamper(pkg, "model.onnx.data")), "--prompt", "hi"]),
        ("tampered adapter file", ["run", str(tamper(pkg, "adapters/good.onnx_adapter")), "--prompt", "hi"]),
        ("manifest from a newer lora-edge", ["run", str(newer), "--prompt", "hi"]),
        ("verify: unknown adapter", ["verify", str(pkg), "--adapter", "nope"]),
        ("profile: unknown adapter", ["profile", str(pkg), "--adapter", "nope"]),
        ("profile: not a package", ["profile", str(base)]),
        ("profile: unknown preset", ["profile", str(pkg), "--preset", "nope"]),
        ("profile: presets file not TOML", ["profile", str(pkg), "--presets", str(good / "adapter_config.json"), "--list-presets"]),
        ("profile: affinity to a CPU that is not there", ["profile", str(pkg), "--affinity", "4096"]),
        ("profile: thread list not numbers", ["profile", str(pkg), "--threads", "1,two"]),
        ("profile: rank sweep on a merged package", ["profile", str(merged), "--ranks", "4"]),
    ]
    rows = []
    for label, args in cases:
        before = set(tmp.rglob("*"))
        r = runner.invoke(cli, args)
        lines = [ln for ln in r.output.splitlines() if ln.strip() and not ln.startswith("[")]
        rows.append({
            "label": label,
            "exit_code": r.exit_code,
            "message": (lines[-1] if lines else "").replace(str(tmp), "…"),
            "error_lines": sum(ln.startswith("Error") for ln in lines),
            "traceback": "Traceback" in r.output or r.exc_info is not None and not isinstance(r.exception, SystemExit),
            "written": sorted(str(p.relative_to(tmp)) for p in set(tmp.rglob("*")) - before),
        })  # fmt: skip
    shutil.rmtree(tmp)
    return rows


def main() -> None:
    with contextlib.redirect_stdout(sys.stderr):  # stdout is the table or the JSON alone
        rows = run_cases()
    if "--json" in sys.argv[1:]:
        print(json.dumps(rows, indent=1, ensure_ascii=False))
        return
    print("| bad input | exit | what the user sees | nothing written |")
    print("|---|---|---|---|")
    for r in rows:
        ok = r["exit_code"] == 2 and not r["traceback"] and not r["written"]
        print(f"| {r['label']} | {r['exit_code']} | `{r['message']}` | {'yes' if not r['written'] else 'NO'}{'' if ok else ' ✗'} |")


if __name__ == "__main__":
    main()
