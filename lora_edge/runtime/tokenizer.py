"""The package's tokenizer: tokenizers for the text, jinja2 for the chat template (rendered as transformers does)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

from ..errors import PackageError, RuntimeInputError


class Tokenizer:
    """tokenizers + the chat template (jinja2, as transformers renders it)."""

    def __init__(self, root: Path) -> None:
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(root / "tokenizer.json"))
        cfg = read_json(root / "tokenizer_config.json")
        gen = read_json(root / "generation_config.json")
        self.chat_template = cfg.get("chat_template")
        if not self.chat_template and (root / "chat_template.jinja").is_file():
            self.chat_template = (root / "chat_template.jinja").read_text()
        self.special = {k: cfg.get(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        self.special = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in self.special.items()}
        eos = gen.get("eos_token_id")
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.special["eos_token"] and self.tok.token_to_id(self.special["eos_token"]) is not None:
            eos_ids.add(self.tok.token_to_id(self.special["eos_token"]))
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        self.add_bos = bool(cfg.get("add_bos_token", False))
        self.bos_id = self.tok.token_to_id(self.special["bos_token"]) if self.special["bos_token"] else None

    def render_chat(self, messages: list[dict]) -> str:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise RuntimeInputError(f"the chat template refused the conversation: {msg}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, indent=indent, ensure_ascii=False)
        try:
            return env.from_string(self.chat_template).render(messages=messages, add_generation_prompt=True, **self.special)
        except jinja2.TemplateError as exc:
            raise PackageError(f"the package's chat template does not render: {exc}") from None

    def encode(self, text: str | Sequence[Mapping[str, str]], chat: bool) -> list[int]:
        """Token ids of a prompt (the chat template applied when ``chat`` and the package has one), or of a conversation:
        a list of {"role": "system" | "user" | "assistant", "content": str} rendered by the chat template."""
        if not isinstance(text, str):
            if not self.chat_template:
                raise RuntimeInputError("this package has no chat template; give the prompt as one string")
            ids = self.tok.encode(self.render_chat(check_messages(text)), add_special_tokens=False).ids
            return ids
        if chat and self.chat_template:
            text = self.render_chat([{"role": "user", "content": text}])
            ids = self.tok.encode(text, add_special_tokens=False).ids
        else:
            ids = self.tok.encode(text, add_special_tokens=False).ids
            if self.add_bos and self.bos_id is not None:
                ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)


def check_messages(messages) -> list[dict]:
    """A conversation as chat templates take it; one clear line for anything else."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise RuntimeInputError("a conversation is a non-empty list of {'role': ..., 'content': ...} messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise RuntimeInputError(f"message {i} must be {{'role': one of {', '.join(ROLES)}, 'content': a string}}, got {m!r}"[:300])
        out.append({"role": m["role"], "content": m["content"]})
    return out


ROLES = ("system", "user", "assistant")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError) as exc:
        raise PackageError(f"{path} is not valid JSON ({exc}); re-export the package") from None
