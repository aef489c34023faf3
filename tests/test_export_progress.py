"""Progress of `export`: lines and bars on stderr, bars only on a terminal, nothing with --quiet; the package
does not depend on how progress is shown. And the fast paths behind it give what the slow ones gave: the GGUF
loader the model transformers loads, the calibration the matrices of one product per layer."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import real_gguf
from lora_edge.cli import cli
from lora_edge.compile.pipeline import export
from lora_edge.compile.progress import Reporter, counting
from lora_edge.config import AdapterSpec
from lora_edge.recipes import export_config

BAR = "\r"  # tqdm redraws its line with carriage returns; progress lines never contain one


def _files(pkg: Path) -> dict[str, bytes]:
    return {str(p.relative_to(pkg)): p.read_bytes() for p in sorted(pkg.rglob("*")) if p.is_file()}


def _same_package(a: Path, b: Path) -> None:
    fa, fb = _files(a), _files(b)
    assert fa.keys() == fb.keys()
    ma, mb = json.loads(fa.pop("manifest.json")), json.loads(fb.pop("manifest.json"))
    assert ma["files"] == mb["files"]  # every file's sha256 and size
    assert fa == fb


@pytest.fixture(scope="module")
def exported(tiny_base, tiny_adapters, tmp_path_factory):
    """The tiny base with an adapter at int4 + GPTQ (the calibration stage counts), through the CLI: quiet and not."""
    root = tmp_path_factory.mktemp("progress")
    args = [str(tiny_base), "-a", f"qv={tiny_adapters['qv_r4']}", "--recipe", "portable"]
    runner = CliRunner()
    loud = runner.invoke(cli, ["export", *args, "-o", str(root / "loud")])
    quiet = runner.invoke(cli, ["export", *args, "-o", str(root / "quiet"), "--quiet"])
    return root, loud, quiet


def test_quiet_prints_only_the_result(exported):
    root, _, quiet = exported
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stderr == ""
    assert quiet.stdout.startswith(f"wrote {root / 'quiet'}") and quiet.stdout.count("\n") == 1


def test_not_a_terminal_prints_lines_but_no_bar(exported):
    _, loud, _ = exported
    assert loud.exit_code == 0, loud.output
    assert "calibrating GPTQ on" in loud.stderr and "writing manifest.json" in loud.stderr
    assert BAR not in loud.stderr


def test_progress_does_not_change_the_package(exported, tiny_base, tiny_adapters):
    root, _, _ = exported
    _same_package(root / "loud", root / "quiet")
    cfg = export_config("portable", base=tiny_base, output=root / "bars", adapters=(AdapterSpec("qv", tiny_adapters["qv_r4"]),))
    stream = io.StringIO()
    export(cfg, progress=Reporter(bars=True, stream=stream))  # as on a terminal
    assert "calibration tokens" in stream.getvalue() and BAR in stream.getvalue()
    _same_package(root / "loud", root / "bars")


def test_counting_draws_only_for_a_reporter_with_bars():
    streams = {k: io.StringIO() for k in ("bars", "plain", "quiet")}
    reporters = {"bars": Reporter(bars=True, stream=streams["bars"]), "plain": Reporter(bars=False, stream=streams["plain"]),
                 "quiet": Reporter(quiet=True, bars=True, stream=streams["quiet"])}  # fmt: skip
    for progress in (*reporters.values(), lambda msg: None):
        with counting(progress, "things done") as step:
            for i in range(5):
                step(i + 1, 5)
    assert "things done" in streams["bars"].getvalue() and "/5 [" in streams["bars"].getvalue()
    assert streams["plain"].getvalue() == "" and streams["quiet"].getvalue() == ""


def test_calibration_shares_one_product_per_input(tiny_base):
    """q/k/v (and gate/up) read one tensor: one X^T X for them, equal to each layer's own, bit for bit."""
    import torch

    from lora_edge.compile.models.loader import load_hf_model
    from lora_edge.compile.quant.calibrate import collect_hessians

    model = load_hf_model(tiny_base)
    modules = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    ids = list(np.random.default_rng(0).integers(3, model.config.vocab_size, 300))
    got = collect_hessians(model, ids, modules, chunk=128)
    want: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}

    def hook_for(name):
        def hook(_module, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            want[name] = want.get(name, 0) + (x.T @ x).numpy()
            counts[name] = counts.get(name, 0) + x.shape[0]

        return hook

    named = dict(model.named_modules())
    handles = [named[m].register_forward_pre_hook(hook_for(m)) for m in modules]
    with torch.no_grad():
        for start in range(0, len(ids), 128):
            model(torch.tensor([ids[start : start + 128]]))
    for h in handles:
        h.remove()
    assert got.keys() == want.keys()
    for m in modules:
        np.testing.assert_array_equal(got[m], want[m] / counts[m], err_msg=m)
    assert got["model.layers.0.self_attn.q_proj"] is got["model.layers.0.self_attn.v_proj"]


def test_gguf_loader_gives_transformers_model():
    """The fast GGUF reader: the same config, tensors and logits as transformers' own GGUF loading."""
    import torch
    from transformers import AutoModelForCausalLM

    from lora_edge.compile.models.loader import load_hf_model

    path = real_gguf()
    ours = load_hf_model(path)
    with contextlib.redirect_stderr(io.StringIO()):
        theirs = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                      local_files_only=True).eval()  # fmt: skip
    a, b = json.loads(theirs.config.to_json_string(use_diff=False)), json.loads(ours.config.to_json_string(use_diff=False))
    a.pop("quantization_config")  # (the GGUF's own quantization; lora-edge drops it: the weights are float)
    assert a == b
    sa, sb = theirs.state_dict(), ours.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ids = torch.tensor([[1, 504, 3458, 314, 260, 3575, 282, 4649, 47]])
    with torch.no_grad():
        assert torch.equal(theirs(ids).logits, ours(ids).logits)


def test_a_q4_0_gguf_base_is_told_of_zero_none():
    """An int4 export of a Q4_0 GGUF with the default float offsets says that --zero none keeps its blocks; a Q4_1
    GGUF (the real one), or --zero given, says nothing."""
    from types import SimpleNamespace

    from lora_edge.compile.models.gguf_file import GGUFFile
    from lora_edge.compile.pipeline import _note_q4_0_source
    from lora_edge.config import ExportConfig, QuantConfig

    path = real_gguf()
    assert GGUFFile(path).block_type() == "Q4_1"  # what load_base records as the base's source_blocks

    def notes(blocks: str, **quant) -> list[str]:
        said = []
        cfg = ExportConfig(base=path, output=Path("unused"), quant=QuantConfig(weights="int4", **quant))
        _note_q4_0_source(cfg, SimpleNamespace(source_blocks=blocks), said.append)
        return said

    assert notes("Q4_1") == []
    assert len(notes("Q4_0")) == 1 and "--zero none" in notes("Q4_0")[0]
    assert notes("Q4_0", zero="float") == [] and notes("Q4_0", zero="none") == []
