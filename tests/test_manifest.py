"""The package format's contract: the golden manifest (tests/golden/manifest.json, reviewed by hand) is what an
export of the tiny model with the `fastest` recipe writes, it reads back through the type unchanged, and readers
refuse what does not fit the type with one line naming the field."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lora_edge.errors import PackageError
from lora_edge.package.manifest import SCHEMA_VERSION, Manifest
from lora_edge.package.store import read_manifest

GOLDEN = Path(__file__).parent / "golden" / "manifest.json"
# Values that depend on where the test runs or on the bytes of float computations, not on the format.
VOLATILE = {"source", "sha256", "source_sha256", "identity", "bytes", "lora_edge_version", "base_model_name_or_path"}


def _normalized(node):
    if isinstance(node, dict):
        return {k: "<volatile>" if k in VOLATILE and not isinstance(v, dict) else _normalized(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_normalized(v) for v in node]
    return node


@pytest.fixture(scope="module")
def fastest_package(tiny_base, tiny_adapters, tmp_path_factory) -> Path:
    from lora_edge.compile.pipeline import export
    from lora_edge.config import AdapterSpec
    from lora_edge.recipes import export_config

    out = tmp_path_factory.mktemp("golden") / "pkg"
    adapters = tuple(AdapterSpec(n, tiny_adapters[n]) for n in ("qv_r4", "all_r8_rslora"))
    export(export_config("fastest", base=tiny_base, output=out, adapters=adapters, quant={"algo": "rtn"}))
    return out


def test_export_writes_the_golden_manifest(fastest_package):
    written = _normalized(json.loads((fastest_package / "manifest.json").read_text()))
    if os.environ.get("LORA_EDGE_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
    assert written == json.loads(GOLDEN.read_text())


def test_the_manifest_round_trips_through_its_type(fastest_package):
    data = json.loads((fastest_package / "manifest.json").read_text())
    manifest = read_manifest(fastest_package)
    assert manifest.to_json() == data and Manifest.from_json(manifest.to_json()) == manifest
    assert manifest.schema_version == SCHEMA_VERSION and manifest.recipe == "custom"  # rtn: not the recipe's gptq
    assert manifest.kernel.features == ("lora_delta_q8", "matmul_q4", "matmul_q8", "w8a8") and manifest.kernel.version == 6


def test_a_recipe_export_records_the_recipe(tiny_base, tiny_adapters, tmp_path):
    from lora_edge.cli import cli
    from click.testing import CliRunner

    out = tmp_path / "pkg"
    r = CliRunner().invoke(cli, ["export", str(tiny_base), "-a", f"x={tiny_adapters['qv_r4']}", "-o", str(out), "--recipe", "portable"])
    assert r.exit_code == 0, r.output
    assert read_manifest(out).recipe == "portable" and "recipe portable" in r.output
    shown = CliRunner().invoke(cli, ["inspect", str(out)])
    assert "recipe portable" in shown.output and "LoRA kernel onnx" in shown.output
    assert "fastest" in CliRunner().invoke(cli, ["export", "--help"]).output


@pytest.mark.parametrize("path, value, needle", [
    (("graph", "target"), "toaster", "graph.target is 'toaster', not one of cpu, mobile, cuda"),
    (("slots", 0, "in_features"), "64", "slots[0].in_features must be int"),
    (("base", "spec"), [], "base.spec must be an object"),
    (("adapters", "qv_r4", "ranks"), 4, "adapters['qv_r4'].ranks must be a list"),
    (("quantization",), None, "has no field 'quantization'"),
])  # fmt: skip
def test_a_malformed_field_is_named(fastest_package, tmp_path, path, value, needle):
    data = json.loads((fastest_package / "manifest.json").read_text())
    node = data
    for key in path[:-1]:
        node = node[key]
    if value is None:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    with pytest.raises(PackageError) as exc:
        Manifest.from_json(data, "manifest.json")
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_schema_1_packages_still_read(fastest_package):
    data = json.loads((fastest_package / "manifest.json").read_text())
    data["schema_version"] = 1
    del data["recipe"]
    del data["graph"]["lora_kernel"]["features"]
    old = Manifest.from_json(data)
    assert old.recipe == "custom" and old.kernel.features == () and old.kernel.version == 6


def test_every_file_of_a_package_has_the_same_readable_mode(fastest_package):
    modes = {p.relative_to(fastest_package).as_posix(): p.stat().st_mode & 0o777 for p in fastest_package.rglob("*") if p.is_file()}
    assert set(modes.values()) == {0o644}, modes

