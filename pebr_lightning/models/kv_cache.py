"""A KV cache whose full-attention layers are written in place instead of grown by copy.

transformers' DynamicLayer appends each decode step's keys and values with
`torch.cat`, which copies the whole cache every step: for a rollout of B*G rows and
T new tokens that is O(T^2) copying, and on CPU it was 30% of an evaluation's time
(docs/BENCHMARKS.md, "Decoding into a reserved KV cache"). When the number of tokens
still to come is known (a rollout's max_new_tokens), the room can be taken once and
each step writes its column. Attention then reads a view of the first L positions:
the same values in the same order as the grown cache, so the logits are the same to
the last bit (tests/models/test_kv_cache.py); only the copies are gone. Memory: the
whole room is taken at the start, the size the growing cache reaches once any row runs
to max_new_tokens (whose last `torch.cat` briefly held two copies of a layer).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


def reserve(cache: object, tokens: int) -> object:
    """Give each plain full-attention layer of `cache` room for `tokens` more positions.

    `cache`: a transformers Cache after the prefill (batch repeats done). Layers of
    another kind (sliding window, quantized, static) are left as they are; a cache
    without per-layer storage is returned unchanged. Returns `cache`, changed in place.
    """
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if layers is None or tokens <= 0:
        return cache
    for i, layer in enumerate(layers):
        if type(layer) is DynamicLayer and layer.get_seq_length() > 0:
            layers[i] = reserved_layer_class().taking_over(layer, tokens)
    return cache


@functools.cache
def reserved_layer_class() -> type:
    """The ReservedLayer class (made on first use: transformers is imported lazily)."""
    from transformers.cache_utils import DynamicLayer

    class ReservedLayer(DynamicLayer):
        """A DynamicLayer whose keys/values are views of buffers with room to spare."""

        @classmethod
        def taking_over(cls, layer: DynamicLayer, tokens: int) -> DynamicLayer:
            new = cls()
            new.__dict__.update(layer.__dict__)  # dtype, device, initialisation state
            length = layer.keys.shape[-2]  # keys, values [N, H, L, D]
            new._key_room = _room(layer.keys, tokens)
            new._value_room = _room(layer.values, tokens)
            new._expose(length)
            return new

        def _expose(self, length: int) -> None:
            """keys/values: the first `length` positions of the room (their shape is
            the used length)."""
            self.keys = self._key_room[..., :length, :]
            self.values = self._value_room[..., :length, :]

        def update(
            self, key_states: Tensor, value_states: Tensor, *args, **kwargs
        ) -> tuple[Tensor, Tensor]:
            used, step = self.keys.shape[-2], key_states.shape[-2]
            room = self._key_room.shape[-2]
            if used + step > room:  # past the room: move to one twice as large
                self._key_room = _room(self.keys, max(step, room))
                self._value_room = _room(self.values, max(step, room))
            self._key_room[..., used : used + step, :] = key_states
            self._value_room[..., used : used + step, :] = value_states
            self._expose(used + step)
            return self.keys, self.values

        def batch_select_indices(self, indices: Tensor) -> None:
            used = self.keys.shape[-2]
            self._key_room = self._key_room[indices, ...]
            self._value_room = self._value_room[indices, ...]
            self._expose(used)

        def batch_repeat_interleave(self, repeats: int) -> None:
            used = self.keys.shape[-2]
            self._key_room = self._key_room.repeat_interleave(repeats, dim=0)
            self._value_room = self._value_room.repeat_interleave(repeats, dim=0)
            self._expose(used)

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            self.batch_select_indices(beam_idx.to(self._key_room.device))

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove < 0:
                self._expose(max(0, self.keys.shape[-2] + tokens_to_remove))
            else:
                super().crop(tokens_to_remove)

        def reset(self) -> None:
            self._expose(0)

    return ReservedLayer


def _room(states: Tensor, tokens: int) -> Tensor:
    """[N, H, L, D] -> [N, H, L + tokens, D], the first L positions holding `states`."""
    n, h, length, d = states.shape
    room = states.new_empty(n, h, length + tokens, d)
    room[..., :length, :] = states
    return room
