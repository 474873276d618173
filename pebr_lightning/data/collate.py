"""Turn manifest records + images into model batches.

A dataset item is `{"record": dict, "image": PIL.Image}`; a collator owns the
processor and the prompt format, so it is built by the LightningModule (which
knows both) and handed to the DataModule's loaders.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils.data import Dataset

from pebr_lightning.algorithms.logprobs import IGNORE_INDEX
from pebr_lightning.data.conversations import chat_messages, conversation_key
from pebr_lightning.data.images import image_paths, load_image
from pebr_lightning.data.prompts import PromptConfig, build_messages, record_response
from pebr_lightning.errors import ManifestError, PebrError


class RecordDataset(Dataset):
    """Validated manifest records; images are decoded when an item is read.

    An item is {"record", "images": [PIL images, in order]} and, for a record of one
    image, also "image" (that image)."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        try:
            images = [load_image(path) for path in image_paths(record)]
        except ManifestError as err:
            # validated at start-up, so the file changed since (or the disk failed):
            # say which sample, and that checkpoints keep what was trained
            raise ManifestError(
                f"sample {record['id']}: {err}; fix or drop that record, then resume "
                "with --ckpt_path last"
            ) from None
        if "images" in record:  # several images, or a conversation record
            return {"record": record, "images": images}
        return {"record": record, "image": images[0], "images": images}


class SFTCollator:
    """Prompt (image + instruction + question) followed by the PeBR response.

    Labels are IGNORE_INDEX on every prompt token (system, user text, image
    tokens, the assistant header), so the loss covers the response and its
    closing <|im_end|> only. The response is tokenized on its own and appended to
    the prompt ids, which is exactly the token sequence generation continues from.
    A conversation record (ShareGPT / messages, data/conversations.py) trains on its
    assistant turns as written, every other token masked (`encode_conversation`).
    """

    def __init__(self, processor: Any, prompt: PromptConfig, max_length: int = 4096) -> None:
        self.processor = processor
        self.prompt = prompt
        self.max_length = max_length

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        if any(conversation_key(item["record"]) is not None for item in items):
            return self._one_by_one(items)
        records = [item["record"] for item in items]
        refuse_control_tokens(records, self.processor.tokenizer, RESPONSE_FIELDS)
        lists = [images_of_item(item) for item in items]
        prompt = encode_prompts(self.processor, records, lists, self.prompt)
        tokenizer = self.processor.tokenizer
        end = tokenizer.eos_token  # <|im_end|> closes the assistant turn
        responses = tokenizer(
            [record_response(r) + end for r in records], add_special_tokens=False
        )["input_ids"]
        sequences, labels = [], []
        for i, record in enumerate(records):
            prompt_ids = prompt["input_ids"][i][prompt["attention_mask"][i].bool()].tolist()
            room = self.max_length - len(prompt_ids)
            if room <= 0:
                raise PebrError(
                    f"sample {record['id']}: the prompt is {len(prompt_ids)} tokens, "
                    f"over max_length={self.max_length}"
                )
            response_ids = responses[i][:room]
            sequences.append(prompt_ids + response_ids)
            labels.append([IGNORE_INDEX] * len(prompt_ids) + response_ids)
        batch = pad_right(sequences, labels, tokenizer.pad_token_id)
        batch["mm_token_type_ids"] = mm_token_types(batch["input_ids"], self.processor)
        batch.update(image_inputs(prompt))
        batch["ids"] = [r["id"] for r in records]
        return batch

    def _one_by_one(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """A batch holding conversation records: each sample encoded alone, then padded
        (their images in sample order, as the image tokens come)."""
        encoded = []
        for item in items:
            if conversation_key(item["record"]) is not None:
                encoded.append(encode_conversation(self.processor, item["record"], item["images"]))
            else:
                one = self([item])
                length = int(one["attention_mask"][0].sum())
                encoded.append(
                    {
                        "input_ids": one["input_ids"][0, :length].tolist(),
                        "labels": one["labels"][0, :length].tolist(),
                        "images": image_inputs(one),
                    }
                )
        for sample, item in zip(encoded, items, strict=True):
            if len(sample["input_ids"]) > self.max_length:
                raise PebrError(
                    f"sample {item['record']['id']}: the conversation is "
                    f"{len(sample['input_ids'])} tokens, over max_length={self.max_length}"
                )
        tokenizer = self.processor.tokenizer
        batch = pad_right(
            [e["input_ids"] for e in encoded],
            [e["labels"] for e in encoded],
            tokenizer.pad_token_id,
        )
        batch["mm_token_type_ids"] = mm_token_types(batch["input_ids"], self.processor)
        with_images = [e["images"] for e in encoded if e["images"]]
        for key in with_images[0] if with_images else ():  # every image, sample after sample
            batch[key] = torch.cat([images[key] for images in with_images])
        batch["ids"] = [item["record"]["id"] for item in items]
        return batch


def encode_conversation(
    processor: Any, record: dict[str, Any], images: list[Any]
) -> dict[str, Any]:
    """One conversation record as input_ids and labels (lists) and its image inputs
    (`images`: the processor's, {} without images): the labels are its assistant turns, each with
    the chat template's end-of-turn token (not the whitespace after it), and
    IGNORE_INDEX everywhere else.

    Each assistant turn's span is found from the template itself: the conversation up
    to the turn's user message, rendered with the generation prompt, must be a prefix
    of the conversation up to and with the turn; the tokens between the two are the
    turn's. A template for which that does not hold (one that rewrites earlier turns) is
    an error naming the sample.
    """
    messages = chat_messages(record)
    refuse_conversation_control_tokens(record, messages, processor.tokenizer)

    def encode(upto: int, generation_prompt: bool) -> dict[str, Any]:
        shown = messages[:upto]
        with template_time_limit([record]):
            text = processor.apply_chat_template(
                shown, add_generation_prompt=generation_prompt, tokenize=False
            )
        count = sum(
            part.get("type") == "image"
            for m in shown
            if isinstance(m["content"], list)
            for part in m["content"]
        )
        inputs = processor(text=[text], images=images[:count] or None, return_tensors="pt")
        return inputs

    full = encode(len(messages), False)
    ids = full["input_ids"][0].tolist()
    labels = [IGNORE_INDEX] * len(ids)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = encode(index, True)["input_ids"][0].tolist()
        end = encode(index + 1, False)["input_ids"][0].tolist()
        if ids[: len(start)] != start or ids[: len(end)] != end or len(end) <= len(start):
            raise PebrError(
                f"sample {record['id']}: the chat template does not render the conversation "
                f"turn by turn (turn {index} changes what comes before it), so its assistant "
                "turns cannot be told from the rest; use a template that appends turns"
            )
        stop = len(end)
        # The template's newline after the end-of-turn token belongs to what follows
        # (generation stops at the end of turn): trained as in the question records.
        while stop > len(start) and not processor.tokenizer.decode(ids[stop - 1]).strip():
            stop -= 1
        labels[len(start) : stop] = ids[len(start) : stop]
    return {"input_ids": ids, "labels": labels, "images": image_inputs(full)}


def refuse_conversation_control_tokens(
    record: dict[str, Any], messages: list[dict[str, Any]], tokenizer: Any
) -> None:
    """ManifestError when a turn's text holds a control token (see refuse_control_tokens)."""
    pattern = control_tokens(tokenizer)
    if pattern is None:
        return
    for index, message in enumerate(messages):
        content = message["content"]
        texts = [content] if isinstance(content, str) else [p.get("text") for p in content]
        for text in texts:
            match = pattern.search(text) if isinstance(text, str) else None
            if match:
                raise ManifestError(
                    f"sample {record.get('id')}: turn {index} ({message['role']}) holds "
                    f"{match[0]!r}, a control token of the model's tokenizer: it would be read "
                    "as that token, not as text; remove it from the data"
                )


@functools.lru_cache(maxsize=8)  # one pattern per tokenizer, not one per batch
def control_tokens(tokenizer: Any) -> re.Pattern | None:
    """A pattern matching the tokenizer's control-token strings (`<|im_end|>`,
    `<|image_pad|>`, ...): the special tokens and the added tokens marked special."""
    found = set(getattr(tokenizer, "all_special_tokens", []))
    for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(token, "special", False):
            found.add(token.content)
    found.discard("")
    if not found:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(found, key=len, reverse=True)))


def refuse_control_tokens(
    records: list[dict[str, Any]], tokenizer: Any, fields: tuple[str, ...]
) -> None:
    """ManifestError naming the sample and field whose text holds a control token.

    The chat template pastes record text into the prompt, and the tokenizer reads a
    control token's string as that token: `<|im_end|>` ends the user turn early (a
    question could then forge an assistant turn the model is trained or rewarded on),
    `<|image_pad|>` asks for image features that are not there. Data is text, so such
    a record is refused rather than silently read as markup.
    """
    pattern = control_tokens(tokenizer)
    if pattern is None:
        return
    for record in records:
        for name in fields:
            value = record.get(name)
            texts = value if isinstance(value, list) else [value]
            for text in texts:
                match = pattern.search(text) if isinstance(text, str) else None
                if match:
                    raise ManifestError(
                        f"sample {record.get('id')}: field {name!r} holds {match[0]!r}, a "
                        "control token of the model's tokenizer: it would be read as that "
                        "token, not as text (a turn ended or an image asked for); remove it "
                        "from the data"
                    )


PROMPT_FIELDS = ("question",)
"""Record fields the prompt is made of."""
RESPONSE_FIELDS = ("description", "rationale", "reasoning", "answer")
"""Record fields an SFT target is made of."""


TEMPLATE_TIME_LIMIT_S = 30.0
"""Seconds a batch of chat-template renders may take (PEBR_TEMPLATE_TIME_LIMIT_S)."""


@contextmanager
def template_time_limit(records: list[dict[str, Any]]) -> Iterator[None]:
    """Stop a chat template that does not finish (a model folder's template that loops)
    with an error naming it, instead of a run that hangs.

    Rendering a template is Python code (Jinja), which a SIGALRM interrupts; milliseconds
    are normal. Only the main thread of a process can take the alarm (the trainer's, or
    a data-loader worker's); elsewhere the render runs unguarded.
    """
    seconds = float(os.environ.get("PEBR_TEMPLATE_TIME_LIMIT_S") or TEMPLATE_TIME_LIMIT_S)
    if threading.current_thread() is not threading.main_thread() or seconds <= 0:
        yield
        return

    def expired(signum, frame) -> None:
        first = records[0].get("id") if records else None
        raise PebrError(
            f"the model's chat template did not finish in {seconds:g} s (batch from sample "
            f"{first}): it loops or is far too slow; fix chat_template in the model folder "
            "(or raise PEBR_TEMPLATE_TIME_LIMIT_S)"
        )

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def encode_prompts(
    processor: Any,
    records: list[dict[str, Any]],
    images: list[list[Any]],
    prompt: PromptConfig,
    padding_side: str = "right",
) -> dict[str, torch.Tensor]:
    """Chat-templated prompts with their image tokens expanded, padded on one side;
    `images` holds each record's images (one list per record: Gemma 3's processor
    needs them grouped; the processor's output lists them sample after sample)."""
    for record in records:
        if conversation_key(record) is not None:
            raise ManifestError(
                f"sample {record['id']}: a conversation record (ShareGPT / messages) is SFT "
                "data; GRPO, sampling and evaluation need a question and an answer to grade"
            )
    refuse_control_tokens(records, processor.tokenizer, PROMPT_FIELDS)
    with template_time_limit(records):
        texts = [
            processor.apply_chat_template(
                build_messages(r, prompt), add_generation_prompt=True, tokenize=False
            )
            for r in records
        ]
    return processor(
        text=texts, images=images, return_tensors="pt", padding=True, padding_side=padding_side
    )


def pad_right(
    sequences: list[list[int]], labels: list[list[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and labels [B, T] padded on the right."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    label_ids = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, (seq, lab) in enumerate(zip(sequences, labels, strict=True)):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        label_ids[i, : len(lab)] = torch.tensor(lab)
        attention[i, : len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": label_ids}


TEXT_KEYS = ("input_ids", "attention_mask", "labels", "token_type_ids", "mm_token_type_ids")
"""A processor's or a collator's per-token outputs; every other tensor is image input."""


def image_inputs(encoded: Any) -> dict[str, torch.Tensor]:
    """The image inputs of a processor's (or collator's) output, whatever the model
    family calls them (Qwen: pixel_values and image_grid_thw; Gemma 3: pixel_values)."""
    return {k: v for k, v in encoded.items() if isinstance(v, torch.Tensor) and k not in TEXT_KEYS}


def mm_token_types(input_ids: torch.Tensor, processor: Any) -> torch.Tensor:
    """Modality of each token (0 text, 1 image, 2 video) [B, T], as the processor defines it.

    Qwen-VL models need this to give image tokens their 2-D (multimodal RoPE)
    positions; without it they silently fall back to 1-D positions.
    """
    return torch.tensor(processor.create_mm_token_type_ids(input_ids.tolist()), dtype=torch.int32)


def prompt_inputs(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model inputs of a PromptCollator batch: every tensor it holds (the rows
    `input_ids`, `attention_mask`, `mm_token_type_ids`; the model family's image inputs;
    `image_counts`, how many images each prompt holds, models/rollout.py: images_of).
    The rest are records and images."""
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


def images_of_item(item: dict[str, Any]) -> list[Any]:
    """A dataset item's images: its `images`, or its one `image`."""
    return item["images"] if "images" in item else [item["image"]]


def prompt_limit(
    max_prompt_tokens: int | None, positions: int | None, max_new_tokens: int
) -> tuple[int | None, str]:
    """GRPO's prompt-length limit and the setting its error names.

    `max_prompt_tokens` when set; unset, the model's `positions` less the completion's
    room (past them a prompt would train on positions the model never had); None when
    neither is known.
    """
    if max_prompt_tokens is not None or positions is None:
        return max_prompt_tokens, "model.max_prompt_tokens"
    setting = (
        f"the model's max_position_embeddings {positions} - "
        f"model.sampling.max_new_tokens {max_new_tokens} (model.max_prompt_tokens unset)"
    )
    return positions - max_new_tokens, setting


class PromptCollator:
    """Prompts only, left-padded for generation, with the records and images kept.

    GRPO samples the responses itself; rewards read `records` (the manifest
    samples) and `images` (the decoded PIL images). With `max_prompt_tokens`, a prompt
    (image tokens included) longer than that is an error naming the sample.
    """

    def __init__(
        self,
        processor: Any,
        prompt: PromptConfig,
        max_prompt_tokens: int | None = None,
        setting: str = "max_prompt_tokens",
    ) -> None:
        self.processor = processor
        self.prompt = prompt
        self.max_prompt_tokens = max_prompt_tokens
        self.setting = setting

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        records = [item["record"] for item in items]
        lists = [images_of_item(item) for item in items]
        batch = dict(encode_prompts(self.processor, records, lists, self.prompt, "left"))
        if self.max_prompt_tokens is not None:
            lengths = batch["attention_mask"].sum(-1).tolist()  # [B]
            for record, length in zip(records, lengths, strict=True):
                if length > self.max_prompt_tokens:
                    raise PebrError(
                        f"sample {record['id']}: the prompt is {length} tokens (image tokens "
                        f"included), over {self.setting}={self.max_prompt_tokens}; raise "
                        "it, shorten the question or use a smaller image"
                    )
        batch["mm_token_type_ids"] = mm_token_types(batch["input_ids"], self.processor)
        batch.pop("token_type_ids", None)  # Gemma 3's processor's copy of the line above
        batch["image_counts"] = torch.tensor([len(own) for own in lists])  # [B]
        batch["records"] = records
        batch["images"] = [own[0] for own in lists]  # each sample's first (rewards' `images`)
        batch["image_lists"] = lists
        return batch
