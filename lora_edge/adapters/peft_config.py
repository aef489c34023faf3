"""adapter_config.json: which fields lora-edge computes with, which never change the numbers, which it refuses, and
PEFT's rules for which modules a config selects (``peft.tuners.tuners_utils.check_target_module_exists`` and
``peft.utils.other.get_pattern_key``)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from ..errors import AdapterError, UnsupportedFeatureError

# Fields that never change the numbers at inference (bookkeeping or initialisation-only).
_HARMLESS = {
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "lora_dropout", "init_lora_weights", "megatron_config", "megatron_core",
    "loftq_config", "eva_config", "corda_config", "lora_ga_config", "runtime_config", "qalora_group_size",
    "ensure_weight_tying", "target_modules_to_tie",
}  # fmt: skip
# Fields lora-edge computes with.
_HANDLED = {
    "r", "lora_alpha", "use_rslora", "target_modules", "exclude_modules", "layers_to_transform",
    "layers_pattern", "rank_pattern", "alpha_pattern", "bias", "fan_in_fan_out", "use_dora", "modules_to_save",
    "alora_invocation_tokens",
}  # fmt: skip
# Fields that change the computation in ways a plain low-rank branch cannot express (yet).
_UNSUPPORTED = {
    "trainable_token_indices": "trainable tokens replace rows of the embedding",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "layer_replication": "layer replication changes the model's depth",
    "lora_bias": "lora_bias adds a trained bias to lora_B",
    "use_qalora": "QA-LoRA pools the input before lora_A",
    "use_bdlora": "block-diagonal LoRA",
    "velora_config": "VeLoRA",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
    "arrow_config": "Arrow routing between adapters",
}


# -- PEFT's matching rules -----------------------------------------------------------------
def _is_excluded(cfg: dict, key: str) -> bool:
    ex = cfg.get("exclude_modules")
    if not ex:
        return False
    if isinstance(ex, str):
        return re.fullmatch(ex, key) is not None
    return key in ex or any(key.endswith(f".{e}") for e in ex)


def target_matches(cfg: dict, key: str, linear_names: set[str]) -> bool:
    """Whether PEFT would put LoRA on module ``key`` under this adapter_config."""
    if _is_excluded(cfg, key):
        return False
    targets = cfg.get("target_modules")
    if targets is None:
        return False
    if isinstance(targets, str):
        if targets.lower() == "all-linear":
            return key in linear_names and key != "lm_head"
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    found = any(key.endswith(f".{t}") for t in targets)
    indexes = cfg.get("layers_to_transform")
    using = indexes is not None and (len(indexes) != 0 if isinstance(indexes, list) else True)
    if found and using:
        patterns = cfg.get("layers_pattern")
        match = None
        if not patterns:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        else:
            for pat in [patterns] if isinstance(patterns, str) else patterns:
                match = re.match(rf"(?:^|.*?\.){pat}\.(?P<idx>\d+)\.", key)
                if match:
                    break
        if match is None:
            return False
        idx = int(match.group("idx"))
        return idx == indexes if isinstance(indexes, int) else idx in indexes
    return found


def pattern_value(patterns: dict, key: str, default):
    """PEFT's get_pattern_key: the first pattern (in insertion order) that matches the end of ``key``."""
    for pat in patterns:
        if re.match(rf"(.*\.)?({pat})$", key):
            return patterns[pat]
    return default


def read_config(path: Path) -> dict:
    cfg_path = path / "adapter_config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise AdapterError(f"cannot read {cfg_path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{cfg_path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{cfg_path} must hold a JSON object")
    return cfg


def check_config(cfg: dict, where: Path) -> None:
    f = where / "adapter_config.json"
    peft_type = cfg.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise UnsupportedFeatureError(f"{f}: peft_type is {peft_type!r}; lora-edge compiles LoRA adapters only")
    for key, why in _UNSUPPORTED.items():
        if cfg.get(key):
            raise UnsupportedFeatureError(
                f"{f}: field {key!r} is set ({why}), which lora-edge cannot compile exactly yet; "
                f"retrain without it or merge the adapter in PyTorch first"
            )
    for key, value in cfg.items():
        if key not in _HARMLESS | _HANDLED | set(_UNSUPPORTED) and value not in (None, False, [], {}, "", 0):
            raise UnsupportedFeatureError(f"{f}: field {key!r} = {value!r} is not known to lora-edge, so it cannot promise exact results")

    def need(key, kinds, ok=lambda v: True, what="") -> None:
        v = cfg.get(key)
        if v is None:
            return
        kinds_t = kinds if isinstance(kinds, tuple) else (kinds,)
        if (isinstance(v, bool) and bool not in kinds_t) or not isinstance(v, kinds_t) or not ok(v):
            raise AdapterError(f"{f}: field {key!r} = {v!r} is invalid{what}")

    need("r", int, lambda v: v > 0, "; it must be a positive integer")
    need("lora_alpha", (int, float), lambda v: math.isfinite(v), "; it must be a number")
    need("use_rslora", bool)
    need("fan_in_fan_out", bool)
    need("target_modules", (str, list), lambda v: isinstance(v, str) or all(isinstance(t, str) for t in v), "; list of names or a regex")
    need("exclude_modules", (str, list), lambda v: isinstance(v, str) or all(isinstance(t, str) for t in v))
    need("layers_to_transform", (int, list), lambda v: isinstance(v, int) or all(isinstance(t, int) for t in v))
    need("layers_pattern", (str, list))
    need("rank_pattern", dict, lambda v: all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v.values()))
    need("alpha_pattern", dict, lambda v: all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v.values()))
    need("bias", str, lambda v: v in ("none", "all", "lora_only"), "; one of none, all, lora_only")
    need("modules_to_save", list, lambda v: all(isinstance(t, str) for t in v), "; a list of module names")
    need("alora_invocation_tokens", list, lambda v: v and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in v),
         "; a list of token ids")  # fmt: skip
    if cfg.get("alora_invocation_tokens") and cfg.get("use_dora"):
        raise UnsupportedFeatureError(f"{f}: activated LoRA with DoRA is not supported (PEFT does not support it either)")
    if cfg.get("target_modules") is None:
        raise AdapterError(f"{f}: field 'target_modules' is missing; the adapter does not say which modules it targets")
    patterns = [(k, cfg[k]) for k in ("target_modules", "exclude_modules") if isinstance(cfg.get(k), str)]
    patterns += [(k, p) for k in ("rank_pattern", "alpha_pattern") for p in (cfg.get(k) or {})]
    patterns += [("layers_pattern", p) for p in ([cfg["layers_pattern"]] if isinstance(cfg.get("layers_pattern"), str) else cfg.get("layers_pattern") or [])]
    for key, pat in patterns:
        if not isinstance(pat, str):
            raise AdapterError(f"{f}: field {key!r} holds {pat!r}, which is not a string")
        try:
            re.compile(pat)
        except (re.error, RecursionError) as exc:
            raise AdapterError(f"{f}: field {key!r} has {pat!r}, which is not a valid regular expression ({exc})") from None
