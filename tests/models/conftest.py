"""Tiny random checkpoints of the other supported Qwen-VL families, saved like hub ones."""

from __future__ import annotations

from pathlib import Path

import pytest


def save_family(out: Path, family: str, tiny_path: Path) -> Path:
    """Save a toy `family` model + processor to `out`, reusing the embedded tokenizer."""
    import torch
    from transformers import (
        AutoProcessor,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
    )
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    tokenizer = AutoProcessor.from_pretrained(tiny_path, local_files_only=True).tokenizer
    ids = {
        "image_token_id": tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        "video_token_id": tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    }
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "pad_token_id": tokenizer.pad_token_id,
    }
    torch.manual_seed(0)
    if family == "qwen2_vl":
        text["rope_parameters"] = {"rope_type": "default", "mrope_section": [2, 3, 3]}
        vision = {"depth": 1, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2}
        model = Qwen2VLForConditionalGeneration(
            Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
        )
        processor = Qwen2VLProcessor(
            image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112),
            tokenizer=tokenizer,
            video_processor=Qwen2VLVideoProcessor(),
            chat_template=tokenizer.chat_template,
        )
    elif family == "qwen3_vl":
        text["head_dim"] = 16
        text["rope_parameters"] = {
            "rope_type": "default",
            "mrope_section": [2, 3, 3],
            "mrope_interleaved": True,
        }
        vision = {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0],
        }
        model = Qwen3VLForConditionalGeneration(
            Qwen3VLConfig(text_config=text, vision_config=vision, **ids)
        )
        processor = Qwen3VLProcessor(
            image_processor=Qwen2VLImageProcessor(
                min_pixels=64 * 64, max_pixels=128 * 128, patch_size=16, merge_size=2
            ),
            tokenizer=tokenizer,
            video_processor=Qwen3VLVideoProcessor(),
            chat_template=tokenizer.chat_template,
        )
    else:
        raise ValueError(family)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def family_path(tmp_path_factory, tiny_path):
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family == "qwen2_5_vl":
            return tiny_path
        if family == "gemma3":  # the second family, built by the demo package
            from pebr_demo.models.tiny_gemma3 import ensure_tiny_gemma3

            return ensure_tiny_gemma3()
        if family not in made:
            made[family] = save_family(tmp_path_factory.mktemp(family), family, tiny_path)
        return made[family]

    return get
