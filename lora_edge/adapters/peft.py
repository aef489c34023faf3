"""Read and validate PEFT LoRA adapters into typed objects, against a base model's modules.

Numpy only, so both sides use it: the exporter against the loaded base, a device against the modules a package's
manifest lists (:class:`PackageModules`). The safetensors file is parsed by :mod:`lora_edge.st_io` and pickle
files are refused.
Matching follows PEFT (``peft.tuners.tuners_utils.check_target_module_exists`` and
``peft.utils.other.get_pattern_key``), and the tensors in the file are cross-checked against the
config, so an adapter that does not match what the config says is refused instead of guessed at.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import AdapterError, InputError, UnsupportedFeatureError
from ..package.manifest import EMBEDDING, DecoderSpec, LinearModule, Manifest
from ..st_io import read_safetensors
from .peft_config import check_config, pattern_value, read_config, target_matches
_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraModule:
    """One adapted linear layer, in graph layout, the scaling already folded into ``b``."""

    module: str
    rank: int
    alpha: float
    scaling: float
    a: np.ndarray = field(repr=False)  # (in, r)  = lora_A.weight.T
    b: np.ndarray = field(repr=False)  # (r, out) = scaling * lora_B.weight.T
    # DoRA: magnitude / ||W + s*B*A|| per output channel, from the float base weight W the adapter was
    # trained on. The layer computes g * (x W^T + s x A^T B^T) + bias (PEFT's DoraLinearLayer, unmerged).
    dora_scale: np.ndarray | None = field(default=None, repr=False)  # (out,)
    # LoRA on the token embedding (lora_embedding_A/B): a is (vocab, r), rows gathered by token id
    embedding: bool = False

    def delta_weight(self) -> np.ndarray:
        """s * B @ A in the HF layout ((out, in); (vocab, dim) for an embedding), float32 — PEFT's ``get_delta_weight``."""
        d = self.a @ self.b  # (in, r) @ (r, out) -> (in, out)
        return (d if self.embedding else d.T).astype(np.float32)

    def merged(self, w: np.ndarray) -> np.ndarray:
        """The merged weight (out, in): W + s*B*A, and for DoRA g * (W + s*B*A)."""
        merged = w + self.delta_weight()
        return (merged if self.dora_scale is None else self.dora_scale[:, None] * merged).astype(np.float32)


@dataclass(frozen=True)
class Adapter:
    name: str
    path: Path
    config: dict = field(repr=False)
    modules: dict[str, LoraModule] = field(repr=False)
    sha256: str = ""
    # PEFT bias="all"/"lora_only": module -> (trained bias - base bias), float32 (out,)
    bias_deltas: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    # PEFT modules_to_save: linear module -> {"weight": (out, in), "bias": (out,)} replacing the base's
    replacements: dict[str, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)

    @property
    def r(self) -> int:
        return int(self.config.get("r", 8))

    @property
    def lora_alpha(self) -> float:
        return float(self.config.get("lora_alpha", 8))

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora", False))

    @property
    def invocation_tokens(self) -> tuple[int, ...] | None:
        """Activated LoRA (PEFT's alora_invocation_tokens): the adapter applies from this token sequence on."""
        tokens = self.config.get("alora_invocation_tokens")
        return tuple(tokens) if tokens else None

    @property
    def use_dora(self) -> bool:
        return any(m.dora_scale is not None for m in self.modules.values())

    @property
    def n_params(self) -> int:
        return sum(m.a.size + m.b.size for m in self.modules.values())

    def summary(self) -> dict:
        ranks = sorted({m.rank for m in self.modules.values()})
        scalings = sorted({round(m.scaling, 8) for m in self.modules.values()})
        targets = sorted({m.module.rsplit(".", 1)[-1] for m in self.modules.values()})
        return {
            "rank": self.r,
            "ranks": tuple(ranks),
            "lora_alpha": self.lora_alpha,
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
            "modules_to_save": tuple(sorted(self.replacements)),
            "scalings": tuple(scalings),
            "target_modules": tuple(targets),
            "modules": len(self.modules),
            "parameters": self.n_params,
            "source": str(self.path),
            "source_sha256": self.sha256,
            "base_model_name_or_path": self.config.get("base_model_name_or_path"),
            "alora_invocation_tokens": self.invocation_tokens,
        }


def _split_key(key: str) -> tuple[str, str]:
    """'base_model.model.X.lora_A.weight' -> ('X', 'lora_A'); other tensors -> (X, kind)."""
    body = key[len(_PREFIX) :] if key.startswith(_PREFIX) else key
    for kind in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"):
        m = re.fullmatch(rf"(.+)\.{kind}(?:\.[A-Za-z0-9_-]+)?(?:\.weight)?", body)
        if m:
            return m.group(1), kind
    if ".modules_to_save." in body or body.endswith(".original_module.weight"):
        return body, "modules_to_save"
    if body.endswith(".base_layer.weight"):
        return body[: -len(".base_layer.weight")], "base_layer"
    if body.endswith(".bias"):  # a trained bias: of a LoRA-wrapped layer (".base_layer.bias") or a plain one
        return body[: -len(".bias")].removesuffix(".base_layer"), "bias"
    return body, "unknown"


class ModuleTable(Protocol):
    """What reading an adapter needs of its base: the modules it may target, and their float weights where a
    feature needs them (DoRA's norms, a trained bias's change, a replaced head's shape)."""

    spec: DecoderSpec
    linear_modules: dict[str, LinearModule]
    other_modules: frozenset[str]
    replaceable: frozenset[str]

    def weight_of(self, module: str) -> np.ndarray | None: ...

    def bias_of(self, module: str) -> np.ndarray | None: ...


@dataclass(frozen=True)
class PackageModules:
    """A package's base as its manifest describes it: every module and shape, no weights."""

    spec: DecoderSpec
    linear_modules: dict[str, LinearModule]
    replaceable: frozenset[str]
    other_modules: frozenset[str] = frozenset()

    @classmethod
    def of(cls, manifest: Manifest) -> PackageModules:
        return cls(manifest.spec, {m.path: m for m in manifest.modules}, frozenset(manifest.replaceable))

    def weight_of(self, module: str) -> None:
        return None

    def bias_of(self, module: str) -> None:
        return None


def _base_weight(name: str, base: ModuleTable, module: str, what: str, bias: bool = False) -> np.ndarray | None:
    """The base's float weight (or bias) of ``module``; a package carries none, so a feature that needs it is refused."""
    if isinstance(base, PackageModules):
        raise UnsupportedFeatureError(
            f"adapter {name!r}: {what} needs the base model's float weights, which a package does not carry; "
            f"add it with `lora-edge adapters add PKG {name}=DIR --base BASE`, or export it with the package"
        )
    return base.bias_of(module) if bias else base.weight_of(module)


def _with_dora(name: str, st: Path, lora: LoraModule, magnitude: np.ndarray | None, base: ModuleTable) -> LoraModule:
    """Attach DoRA's per-channel scale g = magnitude / ||W + s*B*A||_row, W the float base weight."""
    if lora.embedding:
        raise UnsupportedFeatureError(f"adapter {name!r}: DoRA on the embedding {lora.module!r} is not supported yet")
    if magnitude is None:
        raise AdapterError(f"adapter {name!r}: adapter_config.json sets use_dora but {st} has no lora_magnitude_vector for {lora.module!r}")
    w = _base_weight(name, base, lora.module, f"DoRA on {lora.module!r}")
    magnitude = np.asarray(magnitude, np.float32).reshape(-1)
    if w is None or magnitude.shape != (w.shape[0],) or not np.isfinite(magnitude).all():
        raise AdapterError(f"adapter {name!r}: the DoRA magnitude of {lora.module!r} has shape {magnitude.shape}, the layer has {w.shape[0] if w is not None else '?'} outputs")
    norm = np.linalg.norm((w + lora.delta_weight()).astype(np.float32), axis=1)
    return LoraModule(lora.module, lora.rank, lora.alpha, lora.scaling, lora.a, lora.b, dora_scale=(magnitude / norm).astype(np.float32))


def _saved_module(key: str, to_save: list[str]) -> tuple[str, str] | None:
    """(module, "weight"|"bias") when ``key`` is a modules_to_save tensor, PEFT's current layout
    (``<module>.weight``) or its older one (``<module>.modules_to_save.<adapter>.weight``)."""
    if not to_save:
        return None
    body = key[len(_PREFIX) :] if key.startswith(_PREFIX) else key
    body = re.sub(r"\.modules_to_save\.[^.]+\.", ".", body)
    if ".lora_" in body or ".original_module." in body or ".base_layer." in body:
        return None
    module, _, part = body.rpartition(".")
    if part not in ("weight", "bias"):
        return None
    hit = any(f".{t}." in f".{module}." for t in to_save)  # the module itself, or inside it (RoBERTa's classifier.dense)
    return (module, part) if hit else None


def _check_replacement(name: str, st: Path, base: ModuleTable, module: str, part: str, arr: np.ndarray) -> None:
    if module not in base.replaceable or module not in base.linear_modules:
        raise UnsupportedFeatureError(
            f"adapter {name!r}: {st} replaces {module!r} (modules_to_save); lora-edge replaces only output and classification heads "
            f"({', '.join(sorted(base.replaceable)) or 'none in this model'}); merge the adapter in PyTorch first"
        )
    own = _base_weight(name, base, module, f"replacing {module!r} (modules_to_save)", bias=part == "bias")
    if own is None or arr.shape != own.shape or not np.isfinite(arr).all():
        raise AdapterError(f"adapter {name!r}: the saved {module}.{part} has shape {tuple(arr.shape)}, the base's has "
                           f"{tuple(own.shape) if own is not None else 'none'}; the adapter belongs to another model")  # fmt: skip


def check_adapter_files(name: str, path: Path) -> Path:
    """The cheap checks (before any model is loaded): a directory with a config and safetensors weights."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"adapter {name!r}: {path} does not exist; give a PEFT adapter directory")
    if not path.is_dir():
        raise InputError(f"adapter {name!r}: {path} is not a directory; give the PEFT adapter directory (with adapter_config.json)")
    if not (path / "adapter_config.json").is_file():
        raise AdapterError(f"adapter {name!r}: {path} is not a PEFT adapter (no adapter_config.json)")
    st = path / "adapter_model.safetensors"
    if not st.is_file():
        pickles = [n for n in ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth") if (path / n).exists()]
        if pickles:
            raise AdapterError(
                f"adapter {name!r}: {path / pickles[0]} is a pickle file, which lora-edge never loads (it can run code); "
                "re-save it with safe_serialization=True (adapter_model.safetensors)"
            )
        raise AdapterError(f"adapter {name!r}: {path} has no adapter_model.safetensors")
    return st


def read_adapter(name: str, path: Path, base: ModuleTable) -> Adapter:
    """Read ``path`` (a PEFT LoRA directory) as adapter ``name`` for ``base``; refuse anything inexact."""
    path = Path(path)
    st = check_adapter_files(name, path)
    cfg = {k: v for k, v in read_config(path).items() if v is not None}  # null means "the default", as in PEFT
    check_config(cfg, path)
    tensors = read_safetensors(st, AdapterError)

    pairs: dict[str, dict[str, np.ndarray]] = {}
    magnitudes: dict[str, np.ndarray] = {}
    embeddings: set[str] = set()
    biases: dict[str, np.ndarray] = {}
    replacements: dict[str, dict[str, np.ndarray]] = {}
    to_save = cfg.get("modules_to_save") or []
    linear = {lm.peft: lm for lm in base.linear_modules.values()}  # by the names the adapter uses
    for key, arr in tensors.items():
        saved = _saved_module(key, to_save)
        if saved is not None:  # modules_to_save: a trained copy of a whole module
            module, part = saved
            _check_replacement(name, st, base, module, part, arr)
            replacements.setdefault(module, {})[part] = np.asarray(arr, np.float32)
            continue
        module, kind = _split_key(key)
        if kind in ("lora_A", "lora_B"):
            pairs.setdefault(module, {})[kind] = arr
        elif kind in ("lora_embedding_A", "lora_embedding_B"):
            pairs.setdefault(module, {})[kind.replace("embedding_", "")] = arr
            embeddings.add(module)
        elif kind == "lora_magnitude_vector":
            if not cfg.get("use_dora"):
                raise AdapterError(f"adapter {name!r}: {st} holds DoRA magnitudes ({key}) but adapter_config.json has no use_dora; the config and the weights disagree")
            magnitudes[module] = arr
        elif kind == "modules_to_save":
            raise UnsupportedFeatureError(f"adapter {name!r}: {st} holds a module_to_save ({key}); modules_to_save is not supported yet")
        elif kind == "base_layer":
            # PEFT saves a copy of a tied lm_head's base weight; accept it only if it is the base's own (a package
            # carries no float weights to compare with: there the LoRA pairs' shapes are the check).
            if isinstance(base, PackageModules):
                continue
            own = base.weight_of(module)
            if own is None or own.shape != arr.shape or not np.array_equal(own, arr):
                raise UnsupportedFeatureError(
                    f"adapter {name!r}: {st} holds replaced base weights for {module!r} ({key}), which differ from this base's; "
                    "changed base weights are not supported (or the adapter belongs to another base)"
                )
        elif kind == "bias":
            if cfg.get("bias", "none") == "none":
                raise AdapterError(f"adapter {name!r}: {st} holds a bias ({key}) but adapter_config.json has bias='none'; the config and the weights disagree")
            module = linear[module].path if module in linear else module
            if module not in base.linear_modules:
                raise UnsupportedFeatureError(f"adapter {name!r}: {st} holds a trained bias for {module!r}, which is not a linear layer with a bias in this base")
            own = _base_weight(name, base, module, f"a trained bias on {module!r}", bias=True)
            if own is None:
                raise UnsupportedFeatureError(f"adapter {name!r}: {st} holds a trained bias for {module!r}, which is not a linear layer with a bias in this base")
            if arr.shape != own.shape or not np.isfinite(arr).all():
                raise AdapterError(f"adapter {name!r}: the trained bias of {module!r} has shape {tuple(arr.shape)}, the base's has {tuple(own.shape)}")
            if not np.array_equal(arr, own):  # an unchanged bias costs nothing
                biases[module] = (np.asarray(arr, np.float32) - own).astype(np.float32)
        else:
            raise AdapterError(f"adapter {name!r}: {st} holds tensor {key!r}, which is not part of a LoRA adapter")
    if not pairs:
        raise AdapterError(f"adapter {name!r}: {st} holds no lora_A/lora_B tensors")  # (a file of biases alone is not LoRA)

    modules: dict[str, LoraModule] = {}
    for module in sorted(pairs):
        ab = pairs[module]
        if set(ab) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(ab)).pop()
            raise AdapterError(f"adapter {name!r}: module {module!r} has no {missing} tensor in {st}; the file is incomplete")
        if module in embeddings:
            if module != EMBEDDING:
                raise AdapterError(f"adapter {name!r}: has embedding LoRA on {module!r}, which is not this base's token embedding ({EMBEDDING})")
            # PEFT stores lora_embedding_A (r, vocab) and lora_embedding_B (dim, r): the same shapes as a
            # linear layer from vocab to dim, which is how it is checked below
            lin = LinearModule(module, base.spec.vocab_size, base.spec.hidden_size)
        elif module not in linear:
            if module in base.other_modules or module.endswith("embed_tokens"):
                raise AdapterError(f"adapter {name!r}: targets {module!r}, which is not a linear layer in this base; it was trained for another model")
            raise AdapterError(f"adapter {name!r}: targets module {module!r}, which does not exist in the base model; it was trained for another model")
        else:
            lin = linear[module]
        a, b = ab["lora_A"], ab["lora_B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(f"adapter {name!r}: module {module!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, which do not form a low-rank pair")
        r = a.shape[0]
        if a.shape[1] != lin.in_features or b.shape[0] != lin.out_features:
            raise AdapterError(
                f"adapter {name!r}: module {module!r} expects weight ({b.shape[0]}, {a.shape[1]}) but the base has "
                f"({lin.out_features}, {lin.in_features}); the adapter was trained for another base model"
            )
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise AdapterError(f"adapter {name!r}: module {module!r} has NaN or Inf weights; the adapter is broken (diverged training?)")
        if not target_matches(cfg, module, set(linear)):
            raise AdapterError(
                f"adapter {name!r}: {st} has weights for {module!r}, but adapter_config.json's target_modules/"
                "exclude_modules/layers_to_transform do not select it; the config and the weights disagree"
            )
        want_r = pattern_value(cfg.get("rank_pattern") or {}, module, cfg.get("r", 8))
        if want_r != r:
            raise AdapterError(f"adapter {name!r}: module {module!r} has rank {r} in the weights but {want_r} by adapter_config.json (r/rank_pattern)")
        alpha = float(pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", 8)))
        scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        lora = LoraModule(
            module=lin.path,
            rank=r,
            alpha=alpha,
            scaling=scaling,
            a=np.ascontiguousarray(a.T, dtype=np.float32),  # (in, r)
            b=np.ascontiguousarray((b * np.float32(scaling)).T, dtype=np.float32),  # (r, out)
            embedding=module in embeddings,
        )
        if cfg.get("use_dora"):
            lora = _with_dora(name, st, lora, magnitudes.pop(module, None), base)
        modules[lin.path] = lora
    if magnitudes:
        raise AdapterError(f"adapter {name!r}: {st} has DoRA magnitudes for {sorted(magnitudes)[0]!r}, which has no lora_A/lora_B")
    expected = {linear[m].path if m in linear else m for m in (*linear, EMBEDDING) if target_matches(cfg, m, set(linear))}
    missing = sorted(expected - set(modules))
    if missing:
        raise AdapterError(
            f"adapter {name!r}: adapter_config.json targets {len(expected)} modules of this base but {st} has weights for "
            f"{len(modules)} (first missing: {missing[0]}); the file is incomplete or was trained for another model"
        )
    if to_save and not replacements:
        raise AdapterError(f"adapter {name!r}: adapter_config.json lists modules_to_save {to_save} but {st} holds a copy of none of them; "
                           "the config and the weights disagree")  # fmt: skip
    for module, parts in replacements.items():
        if "weight" not in parts:
            raise AdapterError(f"adapter {name!r}: {st} replaces {module!r} (modules_to_save) but holds no weight for it")
        if module in modules:
            raise AdapterError(f"adapter {name!r}: {module!r} is both replaced (modules_to_save) and LoRA-adapted; PEFT never saves both")
    digest = hashlib.sha256(st.read_bytes()).hexdigest()
    return Adapter(name=name, path=path.resolve(), config=cfg, modules=modules, sha256=digest, bias_deltas=biases,
                   replacements=replacements)  # fmt: skip
