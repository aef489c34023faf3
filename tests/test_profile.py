"""`lora-edge profile` on tiny packages: every figure present and sane, a stable JSON schema (golden
file), CSV and PNG output, memory limits that really stop a process, two-package comparison."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import lora_edge
from lora_edge import profile as P
from lora_edge.cli import cli
from lora_edge.errors import InputError
from lora_edge.profile import sandbox

GOLDEN = Path(__file__).parent / "golden" / "profile_schema.json"


def skeleton(x):
    """The shape of a JSON value: keys and types, not values (lists: the shape of their first item)."""
    if isinstance(x, dict):
        return {k: skeleton(v) for k, v in sorted(x.items())}
    if isinstance(x, list):
        return [skeleton(x[0])] if x else []
    if x is None:
        return "null"  # an optional figure: its type is whatever another report gives
    if isinstance(x, bool):
        return "bool"
    if isinstance(x, (int, float)):
        return "number"
    return type(x).__name__


def same_shape(got, want, where="$") -> list[str]:
    """Differences between two skeletons ("null" matches any type; dicts of by-name figures may vary in keys)."""
    if "null" in (got, want):
        return []
    if isinstance(want, dict) and isinstance(got, dict):
        if want.get("*") is not None:  # a map of names to one kind of value (e.g. operator -> share)
            return [d for k, v in got.items() for d in same_shape(v, want["*"], f"{where}.{k}")]
        diffs = [f"{where}: keys {sorted(set(got) ^ set(want))}"] if set(got) != set(want) else []
        return diffs + [d for k in set(got) & set(want) for d in same_shape(got[k], want[k], f"{where}.{k}")]
    if isinstance(want, list) and isinstance(got, list):
        return same_shape(got[0], want[0], f"{where}[0]") if got and want else [f"{where}: empty list"] if want and not got else []
    return [] if got == want else [f"{where}: {got} != {want}"]


@pytest.fixture(scope="module")
def report(tiny_package):
    cfg = P.ProfileConfig(packages=(tiny_package,), adapters=("none", "qv_r4", "all_r8_rslora"), workload=P.Workload(prompt_tokens=(8, 24), new_tokens=6, warmup=1, runs=3),
                          limits=P.Limits(threads=(1, 2)), ranks=(2, 8), adapter_counts=(0, 1, 3))  # fmt: skip
    seen = []
    rep = P.profile(cfg, progress=lambda done, total, what: seen.append((done, total)))
    assert seen and seen[-1][0] == seen[-1][1]  # the progress reached its end
    assert all(a <= b for (a, _), (b, _) in zip(seen, seen[1:]))
    return rep


def test_every_figure_present_and_sane(report, tiny_package):
    adapters = {"none", "qv_r4", "all_r8_rslora"}
    assert {(r.adapter, r.threads, r.prompt_tokens) for r in report.runs} == {(a, t, n) for a in adapters for t in (1, 2) for n in (8, 24)}
    for r in report.runs:
        for s in (r.ttft_ms, r.prefill_tps, r.decode_tps):
            assert 0 < s.min <= s.median <= s.max
        assert 0 < r.token_ms.p50 <= r.token_ms.p95 <= r.token_ms.p99
        assert r.switch_us > 0 and r.runs == 3 and r.new_tokens == 6
        assert (r.rank is None) == (r.adapter == "none")
        # decode speed and per-token latency describe the same steps
        assert r.decode_tps.min <= 1000 / r.token_ms.p50 * 3 and 1000 / r.token_ms.p99 <= r.decode_tps.max * 3
    size = report.packages[0].package_mib
    for m in report.memory:
        assert m.load_s > 0 and m.limit_mib is None
        assert m.peak_mib >= m.loaded_mib > m.baseline_mib > 0
        assert m.peak_mib > size  # a loaded package takes at least its size on disk
        assert m.adapters_mib > 0 and m.kv_cache_mib > 0
        assert m.per_adapter_mib * len(report.packages[0].adapter_file_mib) == pytest.approx(m.adapters_mib)
        # the breakdown: the package's mapped file can hold at most the package; the heap at least the adapters
        assert 0 <= m.mapped_mib <= size and m.anonymous_mib > m.adapters_mib and m.libraries_mib > 0
        assert m.mapped_mib + m.anonymous_mib + m.libraries_mib <= m.peak_mib + 1
    for o in report.ops:
        assert 99 <= sum(o.by_op.values()) <= 101
        assert 0 < o.lora_pct < 100
    by_ad = {o.adapter: o.lora_pct for o in report.ops if o.threads == 1}
    assert set(by_ad) == adapters
    ranks = [p for p in report.sweeps if p.kind == "rank"]
    assert sorted({p.value for p in ranks}) == [2, 8] and all(p.decode_tps > 0 for p in ranks)
    counts = sorted((p.value, p.rss_mib) for p in report.sweeps if p.kind == "adapters" and p.threads == 1)
    assert [c for c, _ in counts] == [0, 1, 3] and counts[-1][1] >= counts[0][1]
    assert report.fits and report.comparison == []
    assert report.machine["onnxruntime"] and report.machine["logical_cpus"] >= 1


def test_json_schema_is_stable(report, compared, too_small):
    """Change the golden file only with a schema version bump (P.SCHEMA). The three reports between
    them fill every list: runs, memory, ops, sweeps (report), comparison (compared), does_not_fit (too_small)."""
    data = report.to_json()
    assert data["schema"] == P.SCHEMA
    data["comparison"] = compared.to_json()["comparison"]
    data["does_not_fit"] = too_small.to_json()["does_not_fit"]
    want = json.loads(GOLDEN.read_text())
    diffs = same_shape(skeleton(data), want)
    assert not diffs, f"the profile JSON changed shape ({diffs[:5]}); bump SCHEMA and regenerate {GOLDEN}"


def test_render_and_csv(report):
    text = P.render(report)
    assert "decode tok/s" in text and "peak RSS MiB" in text and "where decode time goes" in text
    rows = list(csv.DictReader(io.StringIO(report.csv_text())))
    assert len(rows) == len(report.runs)
    assert float(rows[0]["decode_tps_median"]) > 0 and rows[0]["machine_onnxruntime"] and rows[0]["peak_mib"]


def test_cli_writes_json_csv_png(tiny_package, tmp_path):
    out = tmp_path / "p"
    r = CliRunner().invoke(cli, ["profile", str(tiny_package), "-a", "none", "-a", "qv_r4", "--prompt-tokens", "8", "-n", "4", "--runs", "2",
                                 "--json", f"{out}.json", "--csv", f"{out}.csv", "--plot", f"{out}.png"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "decode tok/s" in r.output
    data = json.loads(Path(f"{out}.json").read_text())
    assert {x["adapter"] for x in data["runs"]} == {"none", "qv_r4"}
    png = Path(f"{out}.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert Path(f"{out}.csv").read_text().startswith("package,adapter,")
    assert not list(tmp_path.glob(".*partial"))


@pytest.fixture(scope="module")
def too_small(tiny_package):
    return P.profile(P.ProfileConfig(packages=(tiny_package,), adapters=("qv_r4",), op_profile=False, limits=P.Limits(memory_mib=20),
                                     workload=P.Workload(prompt_tokens=(8,), new_tokens=4, warmup=0, runs=1)))  # fmt: skip


@pytest.fixture(scope="module")
def compared(tiny_package, tiny_base, tiny_adapters, tmp_path_factory):
    from lora_edge.config import AdapterSpec, ExportConfig, Mode
    from lora_edge.compile.pipeline import export

    merged = tmp_path_factory.mktemp("cmp") / "merged"
    export(ExportConfig(base=tiny_base, output=merged, adapters=(AdapterSpec("qv_r4", tiny_adapters["qv_r4"]),), mode=Mode.MERGE))
    return P.profile(P.ProfileConfig(packages=(merged, tiny_package), adapters=("qv_r4",), op_profile=False,
                                     workload=P.Workload(prompt_tokens=(8,), new_tokens=4, warmup=0, runs=1)))  # fmt: skip


@pytest.mark.parametrize("method", ["system", "rss-watchdog"])
def test_memory_limit_fails_small_and_passes_large(tiny_package, monkeypatch, method):
    if method == "rss-watchdog":
        monkeypatch.setattr(sandbox, "cgroup_dir", lambda: None)
    w = P.Workload(prompt_tokens=(8,), new_tokens=4, warmup=0, runs=1)
    seen = []
    small = P.profile(P.ProfileConfig(packages=(tiny_package,), adapters=("qv_r4",), workload=w, op_profile=False,
                                      limits=P.Limits(memory_mib=20)), progress=lambda d, t, what: seen.append((d, t)))  # fmt: skip
    assert seen[-1][0] == seen[-1][1]  # the progress bar still completes
    assert not small.fits and not small.runs
    (d,) = small.does_not_fit
    assert d.needs_mib > 20 and "needs at least" in d.message and "does not fit in 20 MiB" in d.message
    assert d.limit_method == (method if method == "rss-watchdog" else sandbox.limit_method())
    need = int(d.needs_mib) + 200
    big = P.profile(P.ProfileConfig(packages=(tiny_package,), adapters=("qv_r4",), workload=w, op_profile=False,
                                    limits=P.Limits(memory_mib=need)))  # fmt: skip
    assert big.fits and big.memory[0].limit_mib == need and big.memory[0].peak_mib < need


def test_cli_memory_limit_exit_code(tiny_package):
    r = CliRunner().invoke(cli, ["profile", str(tiny_package), "-a", "none", "--prompt-tokens", "8", "-n", "3", "--runs", "1",
                                 "--memory-limit", "20", "--no-op-profile"])  # fmt: skip
    assert r.exit_code == 1
    assert "needs at least" in r.output.splitlines()[-1]


def test_compare_two_packages(compared, tiny_package):
    rep = compared
    rows = {(r.package, r.adapter, r.merged) for r in rep.runs}
    assert rows == {("merged", "qv_r4", True), (tiny_package.name, "qv_r4", False)}
    (c,) = rep.comparison
    assert c["versus"] == "merged" and c["decode_tps_ratio"] > 0 and c["peak_mib_ratio"] > 0


def test_presets(tmp_path):
    presets = P.load_presets()
    assert {"phone-low", "raspberry-pi-4"} <= set(presets)
    lim = P.limits_from_preset("raspberry-pi-4", presets)
    assert lim.threads == (4,) and lim.memory_mib == 2048
    mine = tmp_path / "p.toml"
    mine.write_text('[presets.raspberry-pi-4]\nthreads = 2\nmemory_mib = 900\n[presets.watch]\nthreads = [1, 2]\n')
    presets = P.load_presets(mine)
    assert P.limits_from_preset("raspberry-pi-4", presets).memory_mib == 900  # the user's file wins
    assert P.limits_from_preset("watch", presets).threads == (1, 2)
    (tmp_path / "bad.toml").write_text("[presets.x]\ncores = 2\n")
    with pytest.raises(InputError, match="unknown keys"):
        P.load_presets(tmp_path / "bad.toml")


def test_child_progress_and_percentiles():
    assert P.Percentiles.of([1, 2, 3, 4, 100]).p50 == 3 and P.Percentiles.of([1, 2, 3, 4, 100]).p99 == 100
    s = P.Spread.of([3.0, 1.0, 2.0, 10.0])
    assert (s.min, s.median, s.max) == (1.0, 2.5, 10.0)


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads /proc/self/smaps (Linux)")
def test_read_weights_are_dropped_and_still_read_back(tmp_path):
    """What the runtime does after loading: pages of a package file mapped in and read stay resident until dropped;
    the breakdown counts them as the package's, and dropping them loses no byte."""
    import mmap

    from lora_edge.profile.sandbox import resident_parts
    from lora_edge.runtime.pages import drop_read_pages

    data = np.random.default_rng(0).integers(0, 255, 8 << 20, dtype=np.uint8)
    (tmp_path / "model.onnx.data").write_bytes(data.tobytes())
    with open(tmp_path / "model.onnx.data", "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    view = np.frombuffer(mapped, np.uint8)
    checksum = int(view.sum(dtype=np.int64))  # reads every page
    before = resident_parts(tmp_path)["mapped"]
    drop_read_pages(tmp_path)
    after = resident_parts(tmp_path)["mapped"]
    assert before > 7.5 and after < 0.5, (before, after)
    assert int(view.sum(dtype=np.int64)) == checksum == int(data.sum(dtype=np.int64))
    del view
    mapped.close()


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads /proc/self/smaps (Linux)")
def test_row_read_tensors_are_handed_back_after_every_call(tmp_path):
    """After a graph call, the runtime hands back the mappings the call read a few rows of (an embedding table) and
    keeps those it read in full (a projection's weights); a dropped row reads back the same bytes."""
    import mmap

    from lora_edge.runtime.pages import RowReadPages, file_mappings

    rng = np.random.default_rng(0)
    table, weight = (rng.integers(0, 255, 8 << 20, dtype=np.uint8) for _ in range(2))
    (tmp_path / "model.onnx.data").write_bytes(table.tobytes() + weight.tobytes())
    (tmp_path / "other.bin").write_bytes(table.tobytes())
    maps = []
    for name, at in (("model.onnx.data", 0), ("model.onnx.data", 8 << 20), ("other.bin", 0)):  # as ONNX Runtime maps them
        with open(tmp_path / name, "rb") as f:
            maps.append(mmap.mmap(f.fileno(), 8 << 20, offset=at, prot=mmap.PROT_READ))
    views = [np.frombuffer(m, np.uint8).reshape(-1, 4096) for m in maps]  # the table, the weight, the other file
    addresses = [v.ctypes.data for v in views]

    def call(ids):  # what a graph call reads: a few rows of the table, all of the weight (and rows of another file)
        views[2][ids].sum()
        return [int(views[0][i].sum(dtype=np.int64)) for i in ids], int(views[1].sum(dtype=np.int64))

    def resident():  # MiB resident of the table's mapping, the weight's, the other file's
        at = {m.start: m.resident >> 20 for m in file_mappings(tmp_path)}
        return at[addresses[0]], at[addresses[1]], at[addresses[2]] > 0

    pages = RowReadPages(tmp_path, "model.onnx.data")
    if pages.libc is None:
        pytest.skip("no madvise in this C library")
    first = call([3, 700, 1500])
    pages.release()
    assert resident() == (0, 8, True) and len(pages.ranges) == 1, resident()  # the table dropped, the weight kept
    assert call([3, 700, 1500]) == first
    assert first[0] == [int(table.reshape(-1, 4096)[i].sum(dtype=np.int64)) for i in (3, 700, 1500)]
    call([10, 20])
    pages.release()
    assert resident() == (0, 8, True)

    # the table's mapping goes away (a session rebuilt): its old range is never advised again
    gone = pages.ranges[0]
    views[0] = None
    maps[0].close()
    pages.release()
    assert gone not in pages.ranges and pages.ranges == []


def _cached_pages(path: Path) -> int:
    """How many of ``path``'s pages the page cache holds (mincore on a mapping that touches none of them)."""
    import ctypes
    import mmap

    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    vec = (ctypes.c_ubyte * (-(-len(m) // mmap.PAGESIZE)))()
    buf = ctypes.c_char.from_buffer(m)
    try:
        ctypes.CDLL(None).mincore(ctypes.c_void_p(ctypes.addressof(buf)), ctypes.c_size_t(len(m)), vec)
    finally:
        del buf
        m.close()
    return sum(v & 1 for v in vec)


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads /proc/self/smaps (Linux)")
def test_a_package_without_the_kernel_leaves_its_weights_out_of_the_page_cache(tiny_package, tmp_path):
    """After loading a package whose weights ONNX Runtime copied into its own layout, the runtime asks the kernel
    to drop the weights file's cached pages (rows read later come back a fault at a time, not a large folio each);
    a file some other mapping still reads stays cached."""
    import os
    import shutil

    from lora_edge.runtime.pages import evict_cached

    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_package, pkg)
    data = pkg / "model.onnx.data"
    with open(data, "rb+") as f:  # written back, then read into the page cache: what a first load leaves
        os.fsync(f.fileno())
        f.read()
    assert _cached_pages(data) > 0
    model = lora_edge.load(pkg)
    assert _cached_pages(data) == 0
    assert model.generate_ids([5, 17, 42], None, 4, 4)[0] == lora_edge.load(tiny_package).generate_ids([5, 17, 42], None, 4, 4)[0]
    other = tmp_path / "other.bin"
    other.write_bytes(np.arange(1 << 20, dtype=np.uint8).tobytes())
    with open(other, "rb+") as f:
        os.fsync(f.fileno())
        f.read()
    evict_cached(other)
    assert _cached_pages(other) == 0


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads /proc/self/smaps (Linux)")
def test_row_read_tensors_are_kept_where_their_mappings_cannot_be_checked(tmp_path, monkeypatch):
    """Where /proc/self/map_files cannot confirm the mappings smaps lists, the runtime cannot tell that a range is
    still the weights file's, so it drops nothing."""
    import mmap

    from lora_edge.runtime.pages import RowReadPages, file_mappings

    (tmp_path / "model.onnx.data").write_bytes(np.random.default_rng(0).integers(0, 255, 8 << 20, dtype=np.uint8).tobytes())
    with open(tmp_path / "model.onnx.data", "rb") as f:
        table = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    rows = np.frombuffer(table, np.uint8).reshape(-1, 4096)
    pages = RowReadPages(tmp_path, "model.onnx.data")
    if pages.libc is None:
        pytest.skip("no madvise in this C library")
    monkeypatch.setattr("os.readlink", lambda path: (_ for _ in ()).throw(FileNotFoundError(path)))
    rows[[3, 700, 1500]].sum()
    pages.release()
    assert pages.libc is None and file_mappings(tmp_path)[0].resident > 0


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads /proc/self/smaps (Linux)")
def test_library_pages_are_dropped_and_run_again(tmp_path):
    """What the runtime does after loading a package or its tokenizer: the read-only pages of the files this process
    mapped (the libraries' code) are handed back and read back the same, writable ones are kept with their writes."""
    import mmap

    from lora_edge.runtime.pages import drop_library_pages, file_mappings

    data = np.random.default_rng(1).integers(0, 255, 4 << 20, dtype=np.uint8)
    (tmp_path / "lib.so").write_bytes(data.tobytes())
    (tmp_path / "rw.bin").write_bytes(data.tobytes())
    with open(tmp_path / "lib.so", "rb") as f:
        read_only = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    with open(tmp_path / "rw.bin", "r+b") as f:
        written = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE)
    checksum = int(np.frombuffer(read_only, np.uint8).sum(dtype=np.int64))
    view = np.frombuffer(written, np.uint8)
    view[::4096] = 7  # private copies of every page: dropping them would lose the writes
    resident = {Path(m.path).name: m.resident >> 20 for m in file_mappings(tmp_path)}
    assert resident == {"lib.so": 4, "rw.bin": 4}, resident
    drop_library_pages()
    resident = {Path(m.path).name: m.resident >> 20 for m in file_mappings(tmp_path)}
    if resident["lib.so"] == 4:
        pytest.skip("no madvise, or /proc/self/map_files cannot be read here")
    assert resident == {"lib.so": 0, "rw.bin": 4}, resident
    assert int(np.frombuffer(read_only, np.uint8).sum(dtype=np.int64)) == checksum
    assert (view[::4096] == 7).all() and int(view[1]) == int(data[1])  # (numpy's dropped code ran again)
    del view
    written.close()
    read_only.close()
