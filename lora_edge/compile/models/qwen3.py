"""Qwen3ForCausalLM: the Llama graph (see llama.py for what it reads from the model)."""

from .llama import LlamaFamily

FAMILY = LlamaFamily("qwen3", ('Qwen3ForCausalLM',))
