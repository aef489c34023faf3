"""MistralForCausalLM: the Llama graph (see llama.py for what it reads from the model)."""

from .llama import LlamaFamily

FAMILY = LlamaFamily("mistral", ('MistralForCausalLM',))
