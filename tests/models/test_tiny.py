"""The embedded tiny Qwen2.5-VL: built once, loaded like a real checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    Qwen2_5_VLForConditionalGeneration,
)

from pebr_demo.models.tiny import QWEN_SPECIAL_TOKENS, RECIPE_VERSION, ensure_tiny_model
from pebr_lightning.data.prompts import PromptConfig, build_messages


def test_loads_through_from_pretrained_as_qwen25_vl(tiny_path):
    model = AutoModelForImageTextToText.from_pretrained(tiny_path, local_files_only=True)
    assert isinstance(model, Qwen2_5_VLForConditionalGeneration)
    n_params = sum(p.numel() for p in model.parameters())
    assert 100_000 < n_params < 10_000_000
    tokenizer = AutoProcessor.from_pretrained(tiny_path, local_files_only=True).tokenizer
    for token in QWEN_SPECIAL_TOKENS:  # each special token is one id, and the config agrees
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert model.config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")


def test_second_call_reuses_the_cache(tiny_path):
    stamp = (tiny_path / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model("tiny-qwen2.5-vl") == tiny_path
    assert (tiny_path / "model.safetensors").stat().st_mtime_ns == stamp


def test_chat_template_and_image_tokens(tiny_path):
    processor = AutoProcessor.from_pretrained(tiny_path, local_files_only=True)
    messages = build_messages(
        {"question": "How many shapes are there?"}, PromptConfig(instruction="")
    )
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>How many shapes are there?"
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    batch = processor(
        text=[text], images=[Image.new("RGB", (112, 112), "white")], return_tensors="pt"
    )
    # 112 px -> 8 x 8 patches of 14 px -> 2 x 2 merge -> 16 image tokens
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == 16
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8]]


def test_task_words_are_short_in_the_trained_tokenizer(tiny_path):
    tokenizer = AutoProcessor.from_pretrained(tiny_path, local_files_only=True).tokenizer
    text = "left to right: a red circle, a blue square, a green triangle. 3 shapes."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text  # byte-level BPE round-trips
    assert len(ids) <= 20  # far fewer tokens than the 72 bytes


def test_generates_and_stops_on_im_end(tiny_path):
    model = AutoModelForImageTextToText.from_pretrained(tiny_path, local_files_only=True)
    processor = AutoProcessor.from_pretrained(tiny_path, local_files_only=True)
    text = processor.apply_chat_template(
        build_messages({"question": "How many?"}, PromptConfig()),
        add_generation_prompt=True,
        tokenize=False,
    )
    batch = processor(
        text=[text] * 2, images=[Image.new("RGB", (112, 112))] * 2, return_tensors="pt"
    )
    torch.manual_seed(0)
    out = model.generate(**batch, max_new_tokens=8, min_new_tokens=8, do_sample=True)
    assert out.shape == (2, batch["input_ids"].shape[1] + 8)
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in model.generation_config.eos_token_id


def test_an_empty_pebr_cache_means_the_default_folder(monkeypatch):
    """PEBR_CACHE= (set but empty) once made the cache the working directory."""
    from pebr_demo.models.tiny import cache_dir

    monkeypatch.setenv("PEBR_CACHE", "")
    assert cache_dir() == Path.home() / ".cache" / "pebr_lightning"
    monkeypatch.setenv("PEBR_CACHE", "/somewhere/else")
    assert cache_dir() == Path("/somewhere/else")


def test_a_fresh_cache_folder_is_readable_as_the_umask_allows(tmp_path, monkeypatch):
    """A cache may be shared (PEBR_CACHE on a team disk): not mkdtemp's 0o700 folder
    holding safetensors' 0o600 weights."""
    import os
    import stat

    monkeypatch.setenv("PEBR_CACHE", str(tmp_path))
    old = os.umask(0o022)
    try:
        folder = ensure_tiny_model("tiny-qwen2.5-vl")
    finally:
        os.umask(old)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert stat.S_IMODE((folder / "model.safetensors").stat().st_mode) == 0o644
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {0o644}


def build_rank_1_first(rank: int) -> list[str]:
    """Both ranks of a process group build the embedded model into an empty cache; rank 1
    (whose `save_pretrained` transformers turns into a no-op) starts first."""
    import time

    from pebr_lightning.files import cache_dir

    if rank == 0:
        deadline = time.monotonic() + 120
        while not any(cache_dir().glob(".tiny-qwen2.5-vl-*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)
    return sorted(p.name for p in ensure_tiny_model("tiny-qwen2.5-vl").iterdir())


def test_ranks_building_at_once_all_get_the_complete_model(tmp_path, monkeypatch):
    from pebr_demo.testing.processes import run_gloo

    monkeypatch.setenv("PEBR_CACHE", str(tmp_path))
    listings = run_gloo(build_rank_1_first, world_size=2, timeout_s=300)
    for rank, names in enumerate(listings):
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(names), rank
    assert [p.name for p in tmp_path.iterdir()] == [f"tiny-qwen2.5-vl-r{RECIPE_VERSION}"]
