"""The shared-prompt log-prob forward against the plain full-sequence forward."""

from __future__ import annotations

import pytest
import torch

from pebr_lightning.data.collate import PromptCollator, RecordDataset
from pebr_lightning.data.manifest import load_manifest
from pebr_lightning.data.prompts import PromptConfig
from pebr_lightning.engines.hf import sample_group
from pebr_lightning.models.families import family_of
from pebr_lightning.models.policy import build_policy, unwrap
from pebr_lightning.models.rollout import (
    SamplingConfig,
    all_features,
    completion_logprobs,
    eos_token_ids,
)

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3"]


def rollout_of(path, shapes_data, n_prompts=3, group_size=3):
    built = build_policy(str(path), freeze_vision=False)
    model, processor = built.model, built.processor
    base = unwrap(model)
    dataset = RecordDataset(load_manifest(shapes_data["train"]).records)
    items = [dataset[i] for i in range(n_prompts)]
    for i, item in enumerate(items):  # questions of different lengths: different left padding
        item["record"] = {**item["record"], "question": item["record"]["question"] + " Why?" * i}
    batch = PromptCollator(processor, PromptConfig())(items)
    tok = processor.tokenizer
    sampling = SamplingConfig(group_size=group_size, max_new_tokens=10, temperature=1.0)
    with torch.no_grad():
        rollout = sample_group(
            model.eval(),
            base,
            batch,
            sampling,
            eos_token_ids(tok, family_of(base.config).end_tokens),
            tok.pad_token_id,
            generator=torch.Generator().manual_seed(0),
        )
    assert len(set(batch["attention_mask"].sum(-1).tolist())) > 1  # padding differs
    return model, base, batch, rollout


def weighted_logprobs(base, batch, rollout, rows, share, features=None):
    weights = torch.linspace(-1.0, 1.0, rollout.completion_ids.numel()).view_as(
        rollout.completion_ids
    )[rows]  # [n, T]: any fixed mix, so every position's gradient counts
    logp = completion_logprobs(base, batch, rollout, rows, features, 1.0, share_prompt=share)
    return logp, (logp * weights).sum()


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_prompt_logprobs_and_gradients_equal_the_full_forward(
    family, family_path, shapes_data
):
    """Each prompt run once, its KV cache gathered to its G completions, gives the same
    log-probs and the same gradient for every weight (vision tower included, the image
    patches going through the tower with gradients) as G full-sequence forwards."""
    model, base, batch, rollout = rollout_of(family_path(family), shapes_data)
    model.train()
    rows = torch.arange(rollout.completion_ids.shape[0])
    results = {}
    for share in (False, True):
        model.zero_grad(set_to_none=True)
        logp, objective = weighted_logprobs(base, batch, rollout, rows, share)
        objective.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[share] = (logp.detach(), grads)
    mask = rollout.completion_mask.bool()
    torch.testing.assert_close(
        results[True][0][mask], results[False][0][mask], atol=2e-5, rtol=1e-4
    )
    full, shared = results[False][1], results[True][1]
    assert set(full) == set(shared)
    tower = family_of(base.config).vision_modules[0]
    assert any(f".{tower}." in n for n in full)  # the tower got gradients through both paths
    for name, grad in full.items():
        # float rounding scales with a tensor's largest entry: Gemma 3's random-init
        # projector weight gets gradients of ~1e4, whose small entries differ by ~1e-3
        atol = 1e-5 * (1.0 + float(grad.abs().max()))
        torch.testing.assert_close(shared[name], grad, atol=atol, rtol=1e-3, msg=name)
    # the sampler's own log-probs agree too (the decode used the same positions)
    torch.testing.assert_close(results[True][0][mask], rollout.logprobs[mask], atol=2e-5, rtol=1e-4)


def test_shared_prompt_on_a_micro_batch_that_cuts_groups(tiny_path, shapes_data):
    """A micro-batch holding the tail of one group and the head of the next (and
    precomputed image features): each row's log-probs equal the full forward's."""
    model, base, batch, rollout = rollout_of(tiny_path, shapes_data, n_prompts=3, group_size=3)
    model.eval()
    with torch.no_grad():
        feats = all_features(base, batch)
        rows = torch.tensor([2, 3, 4, 7])  # prompts 0, 1, 1, 2
        shared = completion_logprobs(base, batch, rollout, rows, feats, 1.0, share_prompt=True)
        full = completion_logprobs(base, batch, rollout, rows, None, 1.0)
    mask = rollout.completion_mask[rows].bool()
    assert mask.sum() > 0
    torch.testing.assert_close(shared[mask], full[mask], atol=2e-5, rtol=1e-4)
