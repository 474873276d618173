"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL.

Images: the processor flattens every image into patches, `pixel_values` [sum of
t*h*w, D], with `image_grid_thw` [n, 3] saying how many belong to each; the vision
tower merges 2x2 patches, so an image's features are t*h*w/4 tokens, one per
`<|image_pad|>` of the prompt (features: one tensor per image, lengths differ).
Positions: multimodal RoPE gives image tokens 2-D positions and text after an image
continues from there; the model computes them in a full pass (from the token types,
`mm_token_type_ids`) and keeps the offset of each sequence in `model.rope_deltas`,
which the decode adds to the count of real tokens.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn


class QwenVL:
    vision_modules = ("visual",)
    token_type_key = "mm_token_type_ids"
    image_keys = ("pixel_values", "image_grid_thw")
    placeholder = "<|image_pad|>"
    end_tokens = ("<|im_end|>", "<|endoftext|>")

    def split_images(self, images: Mapping[str, Tensor]) -> list[dict[str, Tensor]]:
        grid = images["image_grid_thw"]  # [n, 3]
        patches = torch.split(images["pixel_values"], grid.prod(-1).tolist())
        return [
            {"pixel_values": p, "image_grid_thw": grid[i : i + 1]} for i, p in enumerate(patches)
        ]

    def join_images(self, parts: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        return {key: torch.cat([p[key] for p in parts]) for key in self.image_keys}

    def encode_images(self, base: nn.Module, images: Mapping[str, Tensor]) -> list[Tensor]:
        out = base.model.get_image_features(
            images["pixel_values"], images["image_grid_thw"], return_dict=True
        )
        return list(out.pooler_output)  # n x [tokens_i, H]

    def feature_inputs(
        self, images: Mapping[str, Tensor], features: Sequence[Tensor]
    ) -> dict[str, Any]:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        pooled = BaseModelOutputWithPooling(pooler_output=tuple(features))
        # the grids stay: the positions of the image tokens are computed from them
        return {"image_grid_thw": images["image_grid_thw"], "mm_encoder_outputs": {"image": pooled}}

    def positions(self, attention_mask: Tensor) -> dict[str, Tensor]:
        del attention_mask  # get_rope_index reads it (and the token types) itself
        return {}

    def position_offset(self, base: nn.Module, attention_mask: Tensor) -> Tensor:
        del attention_mask
        return base.model.rope_deltas  # [B, 1], set by the last full pass

    def collapse_placeholders(self, text: str) -> str:
        return re.sub(f"(?:{re.escape(self.placeholder)})+", self.placeholder, text)
