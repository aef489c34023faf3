"""The CLI: thin over the library; user mistakes give one line, exit code 2, and leave nothing behind."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import lora_edge
from conftest import QUESTION
from lora_edge.cli import cli


@pytest.fixture()
def runner():
    return CliRunner()


def _one_line_error(result, needle):
    assert result.exit_code == 2, result.output
    # progress lines ("[  1.2s] ...") may precede the error on stderr
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip() and not ln.startswith("[")]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert needle in lines[0], lines[0]
    assert "Traceback" not in result.output


def test_export_inspect_run(runner, tiny_base, tiny_adapters, tmp_path):
    out = tmp_path / "pkg"
    r = runner.invoke(cli, ["export", str(tiny_base), "-a", f"qv={tiny_adapters['qv_r4']}", "-a", f"pat={tiny_adapters['patterns']}",
                            "-o", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output and (out / "adapters" / "qv.onnx_adapter").is_file()

    r = runner.invoke(cli, ["inspect", str(out)])
    assert r.exit_code == 0, r.output
    for needle in ("LlamaForCausalLM", "input_ids", "present.*", "slots", "qv", "pat", "q_proj", "MiB"):
        assert needle in r.output, needle
    r = runner.invoke(cli, ["inspect", str(out), "--json"])
    info = json.loads(r.output)
    assert info["adapters"]["pat"]["ranks"] == [2, 3, 6]

    # run prints what the library generates: streamed for one adapter, a row per adapter for several
    model = lora_edge.load(out)
    want = {a: model.generate(QUESTION, adapter=a, max_new_tokens=8) for a in (None, "qv", "pat")}
    assert len(set(want.values())) == 3 and all(w.strip() for w in want.values())  # the adapters show
    r = runner.invoke(cli, ["run", str(out), "--prompt", QUESTION, "-n", "8", "-a", "qv"])
    assert r.exit_code == 0 and r.output.strip() == want["qv"].strip(), r.output
    r = runner.invoke(cli, ["run", str(out), "--prompt", QUESTION, "-n", "8", "-a", "none", "-a", "qv", "-a", "pat"])
    assert r.exit_code == 0, r.output
    rows = [ln.split("|", 1) for ln in r.output.strip().splitlines()]
    assert [(label.strip(), text.strip()) for label, text in rows] == [
        (label, " ".join(want[a].split())) for label, a in (("none", None), ("qv", "qv"), ("pat", "pat"))
    ]


def test_run_unknown_adapter_lists_the_available(runner, tiny_package):
    r = runner.invoke(cli, ["run", str(tiny_package), "--prompt", "hi", "--adapter", "nope"])
    _one_line_error(r, "unknown adapter 'nope'; this package has: all_r8_rslora, layers_exclude, lm_head, patterns, qv_r4, regex_layers")


def test_prompt_longer_than_context(runner, tiny_package):
    r = runner.invoke(cli, ["run", str(tiny_package), "--prompt", "word " * 400])
    _one_line_error(r, "exceed the model's context of 256")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["{missing}", "-o", "{out}"], "does not exist"),
        (["{base}", "-a", "x={missing}", "-o", "{out}"], "does not exist"),
        (["{base}", "-a", "x={base}", "-o", "{out}"], "not a PEFT adapter"),
        (["{base}", "-a", "x={other_ad}", "-o", "{out}"], "trained for another base model"),
        (["{base}", "-a", "x={ad}", "-a", "x={ad}", "-o", "{out}"], "given twice"),
        (["{base}", "-a", "../evil={ad}", "-o", "{out}"], "not a safe file name"),
        (["{base}", "-a", "x={ad}", "-a", "y={ad}", "--mode", "merge", "-o", "{out}"], "exactly one adapter"),
        (["{ad}", "-o", "{out}"], "not a model directory"),
    ],
)
def test_export_user_mistakes(runner, tiny_base, tiny_adapters, foreign_adapter, tmp_path, args, needle):
    out = tmp_path / "pkg"
    fill = dict(missing=tmp_path / "nope", out=out, base=tiny_base, ad=tiny_adapters["qv_r4"], other_ad=foreign_adapter)
    r = runner.invoke(cli, ["export", *[a.format(**fill) for a in args]])
    _one_line_error(r, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, not even a temporary


def test_existing_output_is_refused_and_force_only_replaces_packages(runner, tiny_base, tmp_path):
    out = tmp_path / "pkg"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    r = runner.invoke(cli, ["export", str(tiny_base), "-o", str(out)])
    _one_line_error(r, "already exists")
    r = runner.invoke(cli, ["export", str(tiny_base), "-o", str(out), "--force"])
    _one_line_error(r, "not a lora-edge package")
    assert (out / "precious.txt").read_text() == "keep me"

    pkg = tmp_path / "real"
    assert runner.invoke(cli, ["export", str(tiny_base), "-o", str(pkg)]).exit_code == 0
    r = runner.invoke(cli, ["export", str(tiny_base), "-o", str(pkg), "--force"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg", "real"]


def test_failed_export_leaves_previous_package_intact(runner, tiny_base, tiny_adapters, tmp_path):
    pkg = tmp_path / "pkg"
    assert runner.invoke(cli, ["export", str(tiny_base), "-o", str(pkg)]).exit_code == 0
    before = {p.name: p.read_bytes() for p in pkg.iterdir() if p.is_file()}
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(tiny_adapters["qv_r4"], bad)
    (bad / "adapter_model.safetensors").write_bytes(b"garbage!")
    r = runner.invoke(cli, ["export", str(tiny_base), "-a", f"x={bad}", "-o", str(pkg), "--force"])
    _one_line_error(r, "not a valid safetensors")
    assert {p.name: p.read_bytes() for p in pkg.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "pkg"]


def test_help_has_examples(runner):
    for cmd in ("export", "run", "inspect"):
        r = runner.invoke(cli, [cmd, "--help"])
        assert r.exit_code == 0 and "Example" in r.output
