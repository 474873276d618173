"""SFT batches: response-only labels on the real tokenizer, loss equal to HF's."""

from __future__ import annotations

import pytest
import torch

from pebr_lightning.algorithms.logprobs import IGNORE_INDEX
from pebr_lightning.data.collate import RecordDataset
from pebr_lightning.data.manifest import load_manifest
from pebr_lightning.data.prompts import record_response
from pebr_lightning.errors import PebrError
from pebr_lightning.models.policy import PolicySpec
from pebr_lightning.modules.sft import SFTModule


@pytest.fixture(scope="module")
def module(tiny_path):
    sft = SFTModule(policy=PolicySpec(model=str(tiny_path), freeze_vision=False))
    sft.setup("fit")
    sft.configure_model()
    return sft


@pytest.fixture(scope="module")
def items(shapes_data):
    dataset = RecordDataset(load_manifest(shapes_data["train"]).records)
    return [dataset[i] for i in range(4)]


def test_only_the_response_and_im_end_are_labelled(module, items):
    batch = module.collator("train")(items)
    tokenizer = module.processor.tokenizer
    image_id = module.processor.image_token_id
    for i, item in enumerate(items):
        labels = batch["labels"][i]
        kept = labels[labels != IGNORE_INDEX]
        assert tokenizer.decode(kept) == record_response(item["record"]) + "<|im_end|>"
        # labelled positions are one contiguous block right after the prompt
        positions = (labels != IGNORE_INDEX).nonzero().flatten()
        assert positions.tolist() == list(range(positions[0], positions[0] + len(kept)))
        prompt = tokenizer.decode(batch["input_ids"][i, : positions[0]])
        assert prompt.endswith("<|im_start|>assistant\n")
        assert item["record"]["question"] in prompt
        assert not (batch["input_ids"][i][labels != IGNORE_INDEX] == image_id).any()
    assert int((batch["input_ids"] == image_id).sum()) == 16 * len(items)
    assert batch["mm_token_type_ids"].sum() == 16 * len(items)


def test_chunked_loss_equals_transformers_loss(module, items):
    """Our hidden-state path must give the loss HF computes from full logits + labels."""
    batch = module.collator("train")(items)
    module.logprob_chunk_size = 7  # several chunks, last one partial
    with torch.no_grad():
        ours, mean, n_tokens = module.response_loss(batch)
        inputs = {k: v for k, v in batch.items() if k != "ids"}
        reference = module.policy(**inputs).loss
    assert n_tokens == int((batch["labels"] != IGNORE_INDEX).sum())
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean, reference, rtol=1e-5, atol=1e-5)  # one process: the same


def test_max_length_cuts_the_response_not_the_prompt(module, items):
    full = module.collator("train")(items[:1])
    prompt_len = int((full["labels"][0] == IGNORE_INDEX).sum())
    module.max_length = prompt_len + 5
    try:
        cut = module.collator("train")(items[:1])
    finally:
        module.max_length = 4096
    assert cut["input_ids"].shape[1] == prompt_len + 5
    assert int((cut["labels"] != IGNORE_INDEX).sum()) == 5
    assert torch.equal(cut["input_ids"][0, :prompt_len], full["input_ids"][0, :prompt_len])


def test_prompt_longer_than_max_length_names_the_sample(module, items):
    module.max_length = 10
    try:
        with pytest.raises(PebrError, match=items[0]["record"]["id"]):
            module.collator("train")(items[:1])
    finally:
        module.max_length = 4096
