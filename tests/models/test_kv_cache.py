"""The reserved KV cache (models/kv_cache.py) changes how decoding stores keys and
values, never what it computes: the same completions and log-probs to the last bit."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from pebr_lightning.data.collate import PromptCollator, RecordDataset
from pebr_lightning.data.manifest import load_manifest
from pebr_lightning.data.prompts import PromptConfig
from pebr_lightning.engines import hf
from pebr_lightning.models.kv_cache import reserve, reserved_layer_class
from pebr_lightning.models.policy import build_policy, unwrap
from pebr_lightning.models.rollout import SamplingConfig


def dynamic_and_reserved(states, room):
    """A DynamicLayer holding `states` and a ReservedLayer taken over from a copy of it."""
    plain, other = DynamicLayer(), DynamicLayer()
    plain.update(states.clone(), states.clone() + 1)
    other.update(states.clone(), states.clone() + 1)
    return plain, reserved_layer_class().taking_over(other, room)


def assert_same(plain, reserved):
    assert reserved.get_seq_length() == plain.get_seq_length()
    assert torch.equal(reserved.keys, plain.keys)
    assert torch.equal(reserved.values, plain.values)


def test_a_reserved_layer_holds_what_a_growing_one_holds_through_every_batch_operation():
    torch.manual_seed(0)
    plain, reserved = dynamic_and_reserved(torch.randn(3, 2, 5, 4), room=3)
    assert_same(plain, reserved)
    for _ in range(2):  # decode steps: written in place
        new = torch.randn(3, 2, 1, 4)
        out_plain = plain.update(new, new * 2)
        out_reserved = reserved.update(new, new * 2)
        assert all(torch.equal(a, b) for a, b in zip(out_plain, out_reserved, strict=True))
        assert_same(plain, reserved)
    keep = torch.tensor([2, 0])  # rows dropped and reordered
    plain.batch_select_indices(keep)
    reserved.batch_select_indices(keep)
    assert_same(plain, reserved)
    plain.batch_repeat_interleave(2)
    reserved.batch_repeat_interleave(2)
    assert_same(plain, reserved)
    plain.crop(-1)
    reserved.crop(-1)
    assert_same(plain, reserved)
    for _ in range(3):  # past the room reserved: takes a larger one
        new = torch.randn(4, 2, 1, 4)
        plain.update(new, new - 1)
        reserved.update(new, new - 1)
        assert_same(plain, reserved)
    assert reserved.get_seq_length() == 5 + 2 - 1 + 3
    plain.batch_select_indices(torch.tensor([3, 1]))  # and keeps all of it afterwards
    reserved.batch_select_indices(torch.tensor([3, 1]))
    assert_same(plain, reserved)
    new = torch.randn(2, 2, 4, 4)  # several positions at once, past the room again
    plain.update(new, new)
    reserved.update(new, new)
    assert_same(plain, reserved)


def prompts(path, shapes_data, n=4):
    built = build_policy(str(path))
    dataset = RecordDataset(load_manifest(shapes_data["train"]).records)
    items = [dataset[i] for i in range(n)]
    for i, item in enumerate(items):  # different lengths: different left padding
        item["record"] = {**item["record"], "question": item["record"]["question"] + " Why?" * i}
    return built.model.eval(), PromptCollator(built.processor, PromptConfig())(items)


def decode(model, batch, keyed: bool):
    g = 3
    sampling = SamplingConfig(group_size=g, max_new_tokens=24, temperature=1.0)
    rows = batch["input_ids"].shape[0] * g
    # A random-init model rarely says EOS: ending on any of 60 common ids makes rows
    # finish at different steps, so the cache holds finished rows beside live ones.
    return hf.sample_group(
        model,
        unwrap(model),
        batch,
        sampling,
        eos_ids=list(range(3, 63)),
        pad_id=0,
        keys=torch.arange(rows) * 7919 + 11 if keyed else None,
        generator=None if keyed else torch.Generator().manual_seed(1),
    )


def with_a_full_attention_layer(path, into):
    """The tiny Gemma 3 with its second layer made full attention (real Gemma 3 models
    have one full layer in six; the tiny one has only sliding ones)."""
    shutil.copytree(path, into)
    config = json.loads((into / "config.json").read_text())
    config["text_config"]["layer_types"] = ["sliding_attention", "full_attention"]
    (into / "config.json").write_text(json.dumps(config))
    return into


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3"])
@pytest.mark.parametrize("keyed", [True, False], ids=["keyed", "generator"])
def test_decoding_into_a_reserved_cache_gives_the_completions_and_logprobs_of_a_growing_one(
    family, keyed, family_path, shapes_data, monkeypatch, tmp_path
):
    path = family_path(family)
    if family == "gemma3":
        path = with_a_full_attention_layer(path, tmp_path / "gemma3")
    model, batch = prompts(path, shapes_data)
    taken = []

    def recording(cache, tokens):
        reserve(cache, tokens)
        taken.append([type(layer).__name__ for layer in cache.layers])
        return cache

    monkeypatch.setattr(hf, "reserve", recording)
    fast = decode(model, batch, keyed)
    monkeypatch.setattr(hf, "reserve", lambda cache, tokens: cache)
    slow = decode(model, batch, keyed)

    lengths = fast.completion_mask.sum(-1)
    assert len(set(lengths.tolist())) > 2 and int(lengths.min()) < 24  # rows end apart
    expected = ["ReservedLayer"] * 2  # the full-attention layers are reserved ...
    if family == "gemma3":  # ... and sliding-window ones left as they are
        expected = ["DynamicSlidingWindowLayer", "ReservedLayer"]
    assert taken[0] == expected
    assert torch.equal(fast.completion_ids, slow.completion_ids)
    assert torch.equal(fast.completion_mask, slow.completion_mask)
    assert torch.equal(fast.logprobs, slow.logprobs)  # bit for bit, not approximately
