"""The model-family seam: lookup by model_type, and each family's pure parts checked by
hand (image split/join, positions of a left-padded prompt, placeholders)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pebr_lightning.errors import PebrError
from pebr_lightning.models.families import GROUP, family_of, registered_families
from pebr_lightning.models.families.gemma3 import Gemma3
from pebr_lightning.models.families.qwen_vl import QwenVL


@pytest.mark.parametrize(
    ("model_type", "family"),
    [("qwen2_vl", QwenVL), ("qwen2_5_vl", QwenVL), ("qwen3_vl", QwenVL), ("gemma3", Gemma3)],
)
def test_a_model_type_finds_its_family(model_type, family):
    assert isinstance(family_of(SimpleNamespace(model_type=model_type)), family)
    assert registered_families()[model_type].endswith(family.__name__)


def test_an_unserved_model_type_is_one_error_naming_the_group():
    with pytest.raises(
        PebrError, match=rf"model_type 'llava' \(entry-point group {GROUP}: gemma3, qwen2_5_vl"
    ):
        family_of(SimpleNamespace(model_type="llava"))


def test_qwen_images_split_by_their_grids_and_join_back():
    grid = torch.tensor([[1, 2, 2], [1, 2, 4]])  # 4 and 8 patches
    pixels = torch.arange(12 * 3, dtype=torch.float32).view(12, 3)
    parts = QwenVL().split_images({"pixel_values": pixels, "image_grid_thw": grid})
    assert [p["pixel_values"].shape[0] for p in parts] == [4, 8]
    assert parts[1]["image_grid_thw"].tolist() == [[1, 2, 4]]
    swapped = QwenVL().join_images([parts[1], parts[0]])
    assert torch.equal(swapped["pixel_values"], torch.cat([pixels[4:], pixels[:4]]))
    assert swapped["image_grid_thw"].tolist() == [[1, 2, 4], [1, 2, 2]]


def test_gemma_images_split_one_per_row_and_positions_skip_left_padding():
    pixels = torch.randn(3, 3, 8, 8)
    parts = Gemma3().split_images({"pixel_values": pixels})
    assert [p["pixel_values"].shape for p in parts] == [torch.Size([1, 3, 8, 8])] * 3
    assert torch.equal(Gemma3().join_images([parts[2], parts[0]])["pixel_values"], pixels[[2, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    positions = Gemma3().positions(mask)["position_ids"]
    assert positions.tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]  # k-th real token at k
    assert Gemma3().position_offset(None, mask).tolist() == [[0], [0]]
    assert QwenVL().positions(mask) == {}  # Qwen computes its own (multimodal RoPE)


def test_each_family_collapses_its_expanded_images_to_one_placeholder():
    qwen = "<|vision_start|>" + "<|image_pad|>" * 16 + "<|vision_end|>Q?"
    assert QwenVL().collapse_placeholders(qwen) == "<|vision_start|><|image_pad|><|vision_end|>Q?"
    soft = "<image_soft_token>" * 16
    gemma = f"<start_of_turn>user\n\n\n<start_of_image>{soft}<end_of_image>\n\nQ?"
    assert Gemma3().collapse_placeholders(gemma) == "<start_of_turn>user\n<start_of_image>Q?"
