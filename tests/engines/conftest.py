"""Fixtures shared by the engine tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def untied_path(tiny_path, tmp_path_factory) -> Path:
    """The tiny model with its own output layer (a copy of the embeddings): vLLM's full
    weight reload is exact for it, so full fine-tuning may roll out through vLLM."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = tmp_path_factory.mktemp("untied")
    model = AutoModelForImageTextToText.from_pretrained(tiny_path)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.save_pretrained(folder)
    AutoProcessor.from_pretrained(tiny_path).save_pretrained(folder)
    return folder
