"""`lora-edge verify`: compare a package with the PyTorch + PEFT original it was compiled from.

Compile side (imports torch, transformers, peft). Returns a typed report; the CLI renders it.
For every adapter (and for no adapter) on one text:

- max / mean |Δlogits|, KL(reference ‖ package) per token (nats);
- top-1 next-token agreement over all positions, and over positions where the reference has a
  clear winner (top-1 minus top-2 logit ≥ ``margin``; near-ties flip under any rounding);
- perplexity of both and the relative difference;
- adapter effect retained: cosine and norm ratio of (adapter − base) logits, package vs reference
  (in merge mode the package's base is the reference base: the package has no other);
- greedy agreement: identical prefix length of N greedy tokens from a chat prompt.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from ..config import Mode
from ..errors import InputError
from ..package.manifest import json_of
from ..package.store import read_manifest

DEFAULT_PROMPT = "What is the capital of Italy?"


@dataclass(frozen=True)
class VerifyConfig:
    package: Path
    reference: Path | None = None  # default: the base recorded in the manifest
    adapters: tuple[str, ...] = ()  # default: every adapter in the package
    adapter_paths: dict = field(default_factory=dict)  # name -> PEFT dir, overriding the manifest's sources
    text: Path | None = None
    max_tokens: int = 1024
    greedy_tokens: int = 32
    prompt: str = DEFAULT_PROMPT
    margin: float = 0.5
    max_ppl_increase: float | None = None  # percent
    min_top1: float | None = None  # percent, on clear-winner positions
    providers: tuple[str, ...] = ()  # ONNX Runtime execution providers; default: the package's target

    def __post_init__(self) -> None:
        if self.max_tokens < 16:
            raise InputError(f"--max-tokens must be at least 16, got {self.max_tokens}")
        if self.greedy_tokens < 0:
            raise InputError(f"--greedy-tokens must be >= 0, got {self.greedy_tokens}")


@dataclass
class AdapterReport:
    adapter: str | None
    tokens: int
    max_abs_diff: float
    mean_abs_diff: float
    kl: float
    top1: float
    top1_clear: float
    clear_positions: int
    ppl_reference: float
    ppl_package: float
    ppl_increase: float  # percent, package vs reference
    effect_cosine: float | None
    effect_norm_ratio: float | None
    greedy_tokens: int
    greedy_prefix: int  # how many greedy tokens agree before the first difference
    greedy_reference: str = ""
    greedy_package: str = ""


@dataclass
class VerifyReport:
    package: str
    reference: str
    mode: str
    quantization: dict
    text_tokens: int
    results: list[AdapterReport]
    failures: list[str]

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_json(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def compare_logits(ref: np.ndarray, pkg: np.ndarray, ids: np.ndarray, margin: float) -> dict:
    """Figures for (T, V) logits of the same tokens ``ids`` (T,). Pure numpy; used by tests too."""
    diff = np.abs(ref.astype(np.float64) - pkg)
    lr, lp = _log_softmax(ref), _log_softmax(pkg)
    kl = float((np.exp(lr) * (lr - lp)).sum(-1).mean())
    top_r, top_p = ref.argmax(-1), pkg.argmax(-1)
    part = np.partition(ref, -2, axis=-1)
    clear = (part[:, -1] - part[:, -2]) >= margin
    nll_r = -lr[np.arange(len(ids) - 1), ids[1:]]
    nll_p = -lp[np.arange(len(ids) - 1), ids[1:]]
    ppl_r, ppl_p = math.exp(nll_r.mean()), math.exp(nll_p.mean())
    return dict(
        max_abs_diff=float(diff.max()),
        mean_abs_diff=float(diff.mean()),
        kl=kl,
        top1=float((top_r == top_p).mean() * 100),
        top1_clear=float((top_r == top_p)[clear].mean() * 100) if clear.any() else float("nan"),
        clear_positions=int(clear.sum()),
        ppl_reference=ppl_r,
        ppl_package=ppl_p,
        ppl_increase=(ppl_p / ppl_r - 1) * 100,
    )


def effect_retained(ref_adapter, ref_base, pkg_adapter, pkg_base) -> tuple[float, float]:
    d_ref = (ref_adapter.astype(np.float64) - ref_base).ravel()
    d_pkg = (pkg_adapter.astype(np.float64) - pkg_base).ravel()
    n_ref, n_pkg = np.linalg.norm(d_ref), np.linalg.norm(d_pkg)
    if n_ref == 0:
        return float("nan"), float("nan")
    return float(d_ref @ d_pkg / (n_ref * max(n_pkg, 1e-30))), float(n_pkg / n_ref)


def _prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def verify(cfg: VerifyConfig, progress=lambda m: None) -> VerifyReport:
    import torch

    from .. import runtime
    from .models.loader import _sha256_files, describe_base, load_hf_model

    manifest = read_manifest(cfg.package)
    ref_path = Path(cfg.reference or manifest.base.source)
    _, files = describe_base(ref_path)
    if _sha256_files(files) != manifest.base.sha256:
        raise InputError(f"reference {ref_path} is not the base {cfg.package} was compiled from (its weights' sha256 differs)")
    mode = manifest.mode.value
    known = manifest.adapters
    names = list(cfg.adapters) or sorted(known)
    for n in names:
        if n not in known:
            raise InputError(f"package {cfg.package} has no adapter {n!r}; it has: {', '.join(sorted(known)) or 'none'}")
    sources = {n: Path(cfg.adapter_paths.get(n) or known[n].source) for n in names}
    for n, p in sources.items():
        if not (p / "adapter_config.json").is_file():
            raise InputError(f"adapter {n!r}: its PEFT source {p} is gone; pass --adapter {n}=PATH")

    progress("loading the package")
    model = runtime.load(cfg.package, providers=list(cfg.providers) or None)
    if isinstance(model, runtime.EncoderModel):
        raise InputError(f"{cfg.package} is an encoder package; `verify` measures generation (perplexity, greedy tokens). "
                         "Compare encoders in Python: tests/test_real_encoder.py shows how")  # fmt: skip
    text = cfg.text.read_text(encoding="utf-8") if cfg.text else resources.files("lora_edge").joinpath("data/verify_text.txt").read_text()
    ids = model.tokenizer.encode(text, chat=False)[: min(cfg.max_tokens, model.max_length)]
    if len(ids) < 16:
        raise InputError(f"the text has only {len(ids)} tokens; give at least 16")
    arr = np.asarray([ids], np.int64)
    prompt_ids = model.tokenizer.encode(cfg.prompt, chat=True)

    progress(f"loading the PyTorch reference {ref_path}")
    hf = load_hf_model(ref_path)
    peft_model = None
    if names:
        import warnings

        from peft import PeftModel

        warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes reached via PEFT

        for i, n in enumerate(names):
            progress(f"loading PEFT adapter {n} from {sources[n]}")
            if i == 0:
                peft_model = PeftModel.from_pretrained(hf, str(sources[n]), adapter_name=n).eval()
            else:
                peft_model.load_adapter(str(sources[n]), adapter_name=n)

    def ref_run(adapter):
        import contextlib

        if adapter is None:
            ctx, net = (peft_model.disable_adapter() if peft_model else contextlib.nullcontext()), (peft_model or hf)
        else:
            peft_model.set_adapter(adapter)
            ctx, net = contextlib.nullcontext(), peft_model
        with torch.no_grad(), ctx:
            logits = net(torch.tensor(arr)).logits[0].float().numpy()
            greedy = []
            if cfg.greedy_tokens:
                out = net.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                                   max_new_tokens=cfg.greedy_tokens, min_new_tokens=cfg.greedy_tokens, do_sample=False,
                                   pad_token_id=0)  # fmt: skip
                greedy = out[0, len(prompt_ids) :].tolist()
        return logits, greedy

    def pkg_run(adapter):
        use = None if mode == Mode.MERGE else adapter
        logits = model.forward(arr, adapter=use)[0]
        greedy = model.generate_ids(prompt_ids, use, cfg.greedy_tokens, cfg.greedy_tokens)[0] if cfg.greedy_tokens else []
        return logits, greedy

    rows = [None, *names] if mode != "merge" else names
    progress("running both without an adapter")
    ref_none = ref_run(None)  # every adapter's effect is measured against these; computed once
    pkg_none = pkg_run(None) if mode != "merge" else None
    ref_base = ref_none[0]
    pkg_base = pkg_none[0] if pkg_none is not None else None
    results = []
    for a in rows:
        progress(f"comparing {'no adapter' if a is None else 'adapter ' + a}")
        r_logits, r_greedy = ref_run(a) if a is not None else ref_none
        p_logits, p_greedy = pkg_run(a) if a is not None else pkg_none
        figures = compare_logits(r_logits, p_logits, np.asarray(ids), cfg.margin)
        cos = ratio = None
        if a is not None:
            cos, ratio = effect_retained(r_logits, ref_base, p_logits, pkg_base if pkg_base is not None else ref_base)
        tok = model.tokenizer
        results.append(AdapterReport(
            adapter=a, tokens=len(ids), **figures, effect_cosine=cos, effect_norm_ratio=ratio,
            greedy_tokens=cfg.greedy_tokens, greedy_prefix=_prefix(r_greedy, p_greedy),
            greedy_reference=tok.decode(r_greedy), greedy_package=tok.decode(p_greedy),
        ))  # fmt: skip

    failures = []
    for r in results:
        label = r.adapter or "no adapter"
        if cfg.max_ppl_increase is not None and r.ppl_increase > cfg.max_ppl_increase:
            failures.append(f"{label}: perplexity +{r.ppl_increase:.2f}% exceeds --max-ppl-increase {cfg.max_ppl_increase}%")
        if cfg.min_top1 is not None and not r.top1_clear >= cfg.min_top1:
            failures.append(f"{label}: top-1 agreement {r.top1_clear:.1f}% is below --min-top1 {cfg.min_top1}%")
    return VerifyReport(
        package=str(cfg.package), reference=str(ref_path), mode=mode, quantization=json_of(manifest.quantization),
        text_tokens=len(ids), results=results, failures=failures,
    )  # fmt: skip


def render(report: VerifyReport) -> str:
    q = report.quantization
    head = (
        f"package {report.package} ({report.mode}, weights {q.get('weights')}, embeddings {q.get('embeddings')}) "
        f"vs PyTorch+PEFT on {report.reference}\ntext: {report.text_tokens} tokens"
    )
    cols = f"{'adapter':<12}{'max|Δ|':>9}{'mean|Δ|':>9}{'KL':>9}{'top1%':>7}{'clear%':>8}{'ppl ref':>9}{'ppl pkg':>9}{'Δppl%':>7}{'eff.cos':>8}{'eff.norm':>9}{'greedy':>8}"
    lines = [head, cols]
    for r in report.results:
        eff = f"{r.effect_cosine:>8.3f}{r.effect_norm_ratio:>9.3f}" if r.effect_cosine is not None else f"{'-':>8}{'-':>9}"
        lines.append(
            f"{(r.adapter or 'none'):<12}{r.max_abs_diff:>9.2e}{r.mean_abs_diff:>9.2e}{r.kl:>9.2e}{r.top1:>7.1f}{r.top1_clear:>8.1f}"
            f"{r.ppl_reference:>9.3f}{r.ppl_package:>9.3f}{r.ppl_increase:>+7.2f}{eff}{f'{r.greedy_prefix}/{r.greedy_tokens}':>8}"
        )
    if report.failures:
        lines += ["FAILED:", *("  " + f for f in report.failures)]
    return "\n".join(lines)
