"""The recurrent state an Infini-Transformer carries from one chunk of tokens to the next.

Per layer: the compressive memory ``M`` [B, H_kv, d_k, d_v] and normaliser ``z`` [B, H_kv, d_k],
always float32, plus the keys/values of the current partial segment (fewer than N tokens) so that
token-by-token generation stays bounded too, and with ``model.local_overlap`` = W the last W
keys/values of the previous segment. The size does not depend on how many tokens were read.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor


@dataclass
class LayerState:
    memory: Tensor
    """M: [B, H_kv, d_k, d_v], float32."""
    norm: Tensor
    """z: [B, H_kv, d_k], float32."""
    keys: Tensor
    """Keys of the partial segment, before RoPE: [B, p, H_kv, d_k] with 0 ≤ p < N."""
    values: Tensor
    """Values of the partial segment: [B, p, H_kv, d_v]."""
    context_keys: Tensor
    """Keys before RoPE of the previous segment's last W tokens that local attention also reads:
    [B, w, H_kv, d_k], w = 0 before the first segment is complete (and always when W = 0)."""
    context_values: Tensor
    """Their values: [B, w, H_kv, d_v]."""
    context_visible: Tensor
    """[B, w] bool: False where a stream was reset since (a new document does not read the last)."""

    @classmethod
    def empty(cls, batch: int, n_kv_heads: int, head_dim: int, device: torch.device | str | None,
              dtype: torch.dtype) -> LayerState:
        return cls(
            memory=torch.zeros(batch, n_kv_heads, head_dim, head_dim, device=device,
                               dtype=torch.float32),
            norm=torch.zeros(batch, n_kv_heads, head_dim, device=device, dtype=torch.float32),
            keys=torch.zeros(batch, 0, n_kv_heads, head_dim, device=device, dtype=dtype),
            values=torch.zeros(batch, 0, n_kv_heads, head_dim, device=device, dtype=dtype),
            context_keys=torch.zeros(batch, 0, n_kv_heads, head_dim, device=device, dtype=dtype),
            context_values=torch.zeros(batch, 0, n_kv_heads, head_dim, device=device, dtype=dtype),
            context_visible=torch.zeros(batch, 0, device=device, dtype=torch.bool),
        )

    def tensors(self) -> dict[str, Tensor]:
        return {field.name: getattr(self, field.name) for field in fields(self)}


@dataclass
class InfiniState:
    """Everything a model needs to continue a stream: one :class:`LayerState` per layer."""

    layers: list[LayerState]

    @property
    def batch_size(self) -> int:
        return self.layers[0].memory.shape[0]

    @property
    def partial_len(self) -> int:
        """Tokens of the current, not yet folded-in segment."""
        return self.layers[0].keys.shape[1]

    def _map(self, fn) -> InfiniState:
        return InfiniState([LayerState(**{k: fn(t) for k, t in layer.tensors().items()})
                            for layer in self.layers])

    def detach(self) -> InfiniState:
        """Cut the autograd graph: the truncation point of truncated BPTT."""
        return self._map(Tensor.detach)

    def to(self, device: torch.device | str) -> InfiniState:
        return self._map(lambda t: t.to(device))

    def clone(self) -> InfiniState:
        return self._map(Tensor.clone)

    def without_memory(self) -> InfiniState:
        """This state with every memory emptied (M = 0, z = 0) and the local caches kept: what a
        segment reads when the memory's content is ablated but nothing else changes."""
        return InfiniState([replace(layer, memory=torch.zeros_like(layer.memory),
                                    norm=torch.zeros_like(layer.norm)) for layer in self.layers])

    def select(self, index: Tensor | list[int] | slice) -> InfiniState:
        """The streams at ``index`` along the batch dimension."""
        return self._map(lambda t: t[index])

    @classmethod
    def concat(cls, states: list[InfiniState]) -> InfiniState:
        """The streams of ``states`` side by side along the batch dimension; they must be at the
        same position within their segment (equal ``partial_len``)."""
        return cls([LayerState(**{name: torch.cat([layer.tensors()[name] for layer in layers])
                                  for name in layers[0].tensors()})
                    for layers in zip(*(state.layers for state in states), strict=True)])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers
                   for t in layer.tensors().values())

    def memory_nbytes(self) -> int:
        """Bytes of the compressive memories alone (M and z), independent of the position."""
        return sum(layer.memory.numel() * 4 + layer.norm.numel() * 4 for layer in self.layers)

    def state_dict(self) -> dict[str, Tensor]:
        """Flat name → contiguous tensor mapping, ready for ``safetensors.torch.save_file``."""
        return {f"layers.{i}.{name}": t.contiguous() for i, layer in enumerate(self.layers)
                for name, t in layer.tensors().items()}

    @classmethod
    def from_state_dict(cls, tensors: dict[str, Tensor]) -> InfiniState:
        n_layers = 1 + max(int(name.split(".")[1]) for name in tensors)
        try:
            return cls([LayerState(**{field.name: tensors[f"layers.{i}.{field.name}"]
                                      for field in fields(LayerState)})
                        for i in range(n_layers)])
        except KeyError as missing:
            raise ValueError(f"memory state is missing tensor {missing}; was it saved by "
                             "InfiniState.state_dict()?") from None


def kv_cache_nbytes(n_layers: int, n_kv_heads: int, head_dim: int, tokens: int,
                    bytes_per_value: int = 2) -> int:
    """Bytes of the KV cache a full-attention model of the same shape needs for ``tokens``."""
    return 2 * n_layers * n_kv_heads * head_dim * tokens * bytes_per_value
