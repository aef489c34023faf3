"""An encoder package (BERT, RoBERTa) on the device: hidden states, sentence embeddings, classification. A sibling
of the decoder: it shares the session and adapters, and has no KV cache and no generation."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import RuntimeInputError
from .adapter_set import AdapterChoice
from .session import PackageModel


class EncoderModel(PackageModel):
    """A BERT-style encoder package: ``forward`` gives the last hidden state (and classification logits);
    ``embed`` mean-pools sentences; ``classify`` gives label probabilities. Adapters as for decoders."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        spec = self.manifest.spec
        self.num_labels = spec.num_labels
        self.position_offset = spec.position_offset
        self.has_token_types = bool(spec.type_vocab_size)

    def forward(self, input_ids, adapter: AdapterChoice = None, attention_mask=None, token_type_ids=None, *,
                scale: float = 1.0) -> dict[str, np.ndarray]:  # fmt: skip
        """{"last_hidden_state": (batch, seq, hidden), "logits": (batch, num_labels) for a classifier}."""
        ids = self._as_ids(input_ids)
        if ids.shape[1] > self.max_length:
            raise RuntimeInputError(f"{ids.shape[1]} tokens exceed the model's {self.max_length} positions; shorten the text")
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int64).reshape(ids.shape)
        if self.position_offset >= 0:  # RoBERTa: count the non-padding tokens, starting after pad_token_id
            real = (ids != self.position_offset).astype(np.int64)
            positions = np.cumsum(real, axis=1) * real + self.position_offset
        else:
            positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape)
        with self.bound(adapter, scale) as io:
            io.bind_cpu_input("input_ids", ids)
            io.bind_cpu_input("attention_mask", mask)
            io.bind_cpu_input("position_ids", np.ascontiguousarray(positions))
            if self.has_token_types:
                types = np.zeros_like(ids) if token_type_ids is None else np.asarray(token_type_ids, np.int64).reshape(ids.shape)
                io.bind_cpu_input("token_type_ids", types)
            return dict(zip(self._output_names, self._run(io)))

    def _batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        enc = [self.tokenizer.tok.encode(t, add_special_tokens=True).ids[: self.max_length] for t in texts]
        n = max(len(e) for e in enc)
        pad = self.tokenizer.tok.token_to_id(self.tokenizer.special.get("pad_token") or "") or 0
        ids = np.full((len(enc), n), pad, np.int64)
        mask = np.zeros((len(enc), n), np.int64)
        for i, e in enumerate(enc):
            ids[i, : len(e)], mask[i, : len(e)] = e, 1
        return ids, mask

    def embed(self, texts: Sequence[str], adapter: AdapterChoice = None, normalize: bool = True, *, scale: float = 1.0) -> np.ndarray:
        """Mean-pooled sentence embeddings (batch, hidden), as sentence-transformers computes them."""
        ids, mask = self._batch([texts] if isinstance(texts, str) else list(texts))
        hidden = self.forward(ids, adapter, attention_mask=mask, scale=scale)["last_hidden_state"]
        pooled = (hidden * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1)
        return pooled / np.linalg.norm(pooled, axis=1, keepdims=True) if normalize else pooled

    def classify(self, texts: Sequence[str], adapter: AdapterChoice = None, *, scale: float = 1.0) -> np.ndarray:
        """Label probabilities (batch, num_labels), softmax of the classifier's logits."""
        if not self.num_labels:
            raise RuntimeInputError(f"{self.root} is an encoder without a classification head; use embed()")
        ids, mask = self._batch([texts] if isinstance(texts, str) else list(texts))
        logits = self.forward(ids, adapter, attention_mask=mask, scale=scale)["logits"]
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
