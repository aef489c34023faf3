"""Rebuild a Hugging Face tokenizer from a GGUF file's own metadata.

transformers' GGUF->HF conversion damages this model family's tokenizer (eos becomes
<|im_start|>, BOS is prepended to every encode, digits are no longer split one by one), so
lora-edge writes tokenizer.json / tokenizer_config.json / generation_config.json straight
from the GGUF fields, which are right (see DESIGN.md, "Facts measured").
"""

from __future__ import annotations

import json
from pathlib import Path

from ...errors import ModelError
from .gguf_file import GGUFFile

# llama.cpp pre-tokenizer names whose regex is "split digits one by one, then GPT-2's regex".
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "codeshell", "qwen2", "deepseek-coder"}
_GPT2_PRE = {"gpt2", "default", "llama-bpe", "olmo", "jais", "phi-2"}
_CONTROL, _USER_DEFINED = 3, 4


def tokenizer_files_from_gguf(path: Path, reader: GGUFFile | None = None) -> dict[str, bytes]:
    """tokenizer.json and its config rebuilt from the GGUF's metadata (``reader``: the file already opened)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    reader = reader or GGUFFile(path)
    kind = reader.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelError(
            f"{path}: GGUF tokenizer model {kind!r} cannot be rebuilt yet (only byte-level BPE, 'gpt2'); "
            "export from a Hugging Face model directory instead"
        )
    pre = reader.get("tokenizer.ggml.pre", "default")
    tokens: list[str] = reader.get("tokenizer.ggml.tokens")
    types: list[int] = reader.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges: list[str] = reader.get("tokenizer.ggml.merges") or []
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in _GPT2_PRE:
        tok.pre_tokenizer = byte_level
    else:
        raise ModelError(f"{path}: GGUF pre-tokenizer {pre!r} is not known to lora-edge; export from a Hugging Face directory")
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty in (_CONTROL, _USER_DEFINED)]
    tok.add_special_tokens(special)

    def tok_at(key):
        i = reader.get(key)
        return (tokens[i], int(i)) if i is not None and 0 <= int(i) < len(tokens) else (None, None)

    bos, bos_id = tok_at("tokenizer.ggml.bos_token_id")
    eos, eos_id = tok_at("tokenizer.ggml.eos_token_id")
    pad, pad_id = tok_at("tokenizer.ggml.padding_token_id")
    unk, _ = tok_at("tokenizer.ggml.unknown_token_id")
    add_bos = bool(reader.get("tokenizer.ggml.add_bos_token", False))
    tok_config = {
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": pad,
        "unk_token": unk,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(reader.get(f"{reader.get('general.architecture')}.context_length", 2048)),
        "tokenizer_class": "GPT2Tokenizer",
    }
    template = reader.get("tokenizer.chat_template")
    if template:
        tok_config["chat_template"] = template
    gen = {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id, "do_sample": False}
    dump = lambda d: (json.dumps(d, indent=2, sort_keys=True) + "\n").encode()  # noqa: E731
    return {
        "tokenizer.json": tok.to_str(pretty=True).encode(),
        "tokenizer_config.json": dump(tok_config),
        "generation_config.json": dump(gen),
    }
