"""Group rollouts and log-prob passes that encode each prompt once.

`generate(num_return_sequences=G)` copies every prompt G times, so the language
model prefills each prompt G times, and a plain log-prob forward over the B·G
sequences re-encodes every image G times. Here:

- the vision tower runs once per image per step (`encode_images` of the model's
  family, models/families/), and its output
  is handed to the model (`mm_encoder_outputs`) for the prefill and every log-prob
  pass, repeated for the G sequences of a group when the tower is frozen;
- the prompt is prefilled once at batch B, its KV cache repeated G times, and only
  the decode runs at batch B·G (`sample_group`, in engines/hf.py).

Models whose forward does not take `mm_encoder_outputs` fall back to `pixel_values`.
A prompt batch is a mapping: rows (`input_ids`, `attention_mask`, `mm_token_type_ids`
[B, P], the modality of each token whatever keyword the family's forward takes it
by), the family's image inputs, and `image_counts` [B] when a prompt holds other than
one image. The family (models/families/) says how its images split and join.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from pebr_lightning.algorithms.logprobs import token_logprobs
from pebr_lightning.errors import PebrError
from pebr_lightning.models.families import ModelFamily, family_of


@dataclass(frozen=True)
class SamplingConfig:
    """How completions are sampled (defaults: the paper's rollout settings)."""

    group_size: int = 8
    """Completions per prompt (the paper's n)."""
    temperature: float = 1.2
    """Softmax temperature; the loss scales logits by the same value. 0 decodes
    greedily (evaluation; GRPO training needs > 0)."""
    top_p: float = 0.99
    """Nucleus sampling mass; 1.0 disables it."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 disables it."""
    max_new_tokens: int = 2048
    """Completion length cap; a completion that reaches it without EOS counts as truncated."""
    min_new_tokens: int = 0
    """EOS cannot be sampled before this many tokens (as in `generate(min_new_tokens=...)`);
    equal to max_new_tokens it forces every completion to full length (benchmarks)."""

    def __post_init__(self) -> None:
        if self.group_size < 1:
            raise PebrError(f"sampling.group_size must be >= 1, got {self.group_size}")
        if self.temperature < 0:
            raise PebrError(f"sampling.temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise PebrError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise PebrError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise PebrError(
                f"sampling.min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], "
                f"got {self.min_new_tokens}"
            )


@dataclass
class Rollout:
    """G sampled completions for each of B prompts; group members are contiguous."""

    prompt_ids: Tensor
    """[B, P] left-padded prompt tokens."""
    prompt_mask: Tensor
    """[B, P] 1 on real prompt tokens."""
    completion_ids: Tensor
    """[B*G, T] sampled tokens, padding after EOS."""
    completion_mask: Tensor
    """[B*G, T] 1 up to and including EOS."""
    logprobs: Tensor
    """[B*G, T] log-probs of the sampled tokens at sampling time (temperature-scaled)."""
    truncated: Tensor
    """[B*G] True where max_new_tokens was reached without EOS."""
    group_size: int
    seconds: float
    """Wall time of the rollout."""
    features: list[Tensor] | None = None
    """Per-image features the engine computed (HFEngine), for the log-prob passes to
    reuse; None when it computed none (or they cannot be reused)."""
    first_token_seconds: float | None = None
    """Wall time to the first sampled token (image encoding and prefill included), when
    the engine measured it; `seconds` less this is the decode of the other tokens."""


def vision_token_ids(config: Any) -> list[int]:
    """Placeholder and delimiter ids of images/videos, which a completion must not contain."""
    names = (
        "image_token_id",
        "video_token_id",
        "vision_start_token_id",
        "vision_end_token_id",
        "boi_token_id",
        "eoi_token_id",
    )
    return [i for i in (getattr(config, n, None) for n in names) if i is not None]


def supports_shared_features(base: nn.Module) -> bool:
    """Whether the model's forward accepts precomputed image features."""
    return "mm_encoder_outputs" in inspect.signature(base.model.forward).parameters


def features_of(base: nn.Module, prompt: dict[str, Tensor], prompts: Tensor) -> list:
    """Image features of the prompts `prompts` only (one tower pass, with gradients when
    enabled); None in the other images' slots (the list is indexed by image)."""
    family = family_of(base.config)
    wanted = images_of(prompt, sorted(set(prompts.tolist())))
    parts = family.split_images(prompt)
    encoded = family.encode_images(base, family.join_images([parts[i] for i in wanted]))
    features: list = [None] * len(parts)
    for i, feats in zip(wanted, encoded, strict=True):
        features[i] = feats
    return features


def all_features(base: nn.Module, prompt: dict[str, Tensor]) -> list[Tensor]:
    """Features of every image of the batch, in order (one vision-tower pass)."""
    return family_of(base.config).encode_images(base, prompt)


def images_of(prompt: dict[str, Tensor], prompts: list[int]) -> list[int]:
    """The images (indices into `image_grid_thw`, the patches, the features) of the
    prompts `prompts`, in that order. A prompt holds `image_counts[i]` images (one each
    when the batch has no `image_counts`), in prompt order, as the processor lays them out."""
    counts = prompt.get("image_counts")
    if counts is None:
        return list(prompts)
    starts = [0, *torch.cumsum(counts, 0).tolist()]  # [B + 1]
    return [j for i in prompts for j in range(starts[i], starts[i + 1])]


def model_inputs(
    family: ModelFamily,
    prompt: dict[str, Tensor],
    rows: Tensor,
    group_size: int,
    features: list[Tensor] | None,
) -> dict[str, Any]:
    """Image inputs for sequences `rows` of a B·G batch (row r belongs to prompt r // G):
    the images of each sequence's prompt, sequence after sequence; their precomputed
    `features` in place of the pixels when given."""
    images = images_of(prompt, (rows // group_size).tolist())  # n_images
    parts = family.split_images(prompt)
    picked = family.join_images([parts[i] for i in images])
    if features is not None:
        return family.feature_inputs(picked, [features[i] for i in images])
    return picked


def row_inputs(family: ModelFamily, token_types: Tensor, attention_mask: Tensor) -> dict:
    """The per-token modality ids under the family's keyword, and the positions of a
    full pass where the family needs them given."""
    return {family.token_type_key: token_types, **family.positions(attention_mask)}


def eos_token_ids(tokenizer: Any, end_tokens: tuple[str, ...]) -> list[int]:
    """Ids that end a completion: the family's end-of-turn tokens the tokenizer has
    (else the tokenizer's own EOS)."""
    ids = [tokenizer.convert_tokens_to_ids(t) for t in end_tokens]
    ids = [i for i in ids if i is not None and i != tokenizer.unk_token_id]
    if not ids and tokenizer.eos_token_id is not None:
        ids = [tokenizer.eos_token_id]
    return ids


def decode_completions(tokenizer: Any, rollout: Rollout) -> list[str]:
    """The B·G completions as text, special tokens (EOS) left out."""
    ids = rollout.completion_ids.masked_fill(rollout.completion_mask == 0, 0)
    return tokenizer.batch_decode(
        [row[mask.bool()] for row, mask in zip(ids, rollout.completion_mask, strict=True)],
        skip_special_tokens=True,
    )


def completion_logprobs(
    base: nn.Module,
    prompt: dict[str, Tensor],
    rollout: Rollout,
    rows: Tensor,
    features: list[Tensor] | None,
    temperature: float,
    chunk_size: int = 1024,
    share_prompt: bool = False,
) -> Tensor:
    """log p(completion tokens) for sequences `rows` of the rollout -> [n, T] (0 on padding).

    The prompt's image features are reused from `features` when given, so the vision
    tower does not run again. `share_prompt` runs each distinct prompt of `rows` once
    (`shared_prompt_hidden`); otherwise one forward over each prompt + completion.
    """
    g = rollout.group_size
    family = family_of(base.config)
    prompts = rows // g  # [n]
    completion = rollout.completion_ids[rows]  # [n, T]
    cmask = rollout.completion_mask[rows]  # [n, T]
    if share_prompt:
        predicting = shared_prompt_hidden(
            base, prompt, rollout, prompts, completion, cmask, features
        )
    else:
        input_ids = torch.cat([rollout.prompt_ids[prompts], completion], dim=1)  # [n, P+T]
        attention = torch.cat([rollout.prompt_mask[prompts], cmask], dim=1)  # [n, P+T]
        mm_types = torch.cat(
            [prompt["mm_token_type_ids"][prompts], torch.zeros_like(completion, dtype=torch.int32)],
            dim=1,
        )  # [n, P+T]
        hidden = base.model(
            input_ids=input_ids,
            attention_mask=attention,
            use_cache=False,
            **row_inputs(family, mm_types, attention),
            **model_inputs(family, prompt, rows, g, features),
        ).last_hidden_state  # [n, P+T, H]
        p = rollout.prompt_ids.shape[1]
        predicting = hidden[:, p - 1 : -1]  # [n, T, H]: position t predicts completion token t
    keep = cmask.bool()  # [n, T]
    out = torch.zeros(cmask.shape, dtype=torch.float32, device=predicting.device)  # [n, T]
    out[keep] = token_logprobs(
        predicting[keep], base.lm_head, completion[keep], chunk_size, temperature
    )  # [N]
    return out


def shared_prompt_hidden(
    base: nn.Module,
    prompt: dict[str, Tensor],
    rollout: Rollout,
    prompts: Tensor,
    completion: Tensor,
    cmask: Tensor,
    features: list[Tensor] | None,
) -> Tensor:
    """Hidden states predicting each completion token -> [n, T, H], each prompt run once.

    The u distinct prompts among `prompts` [n] go through the model at batch u; their
    KV cache is gathered to the n sequences and the completions [n, T] (mask `cmask`) run on
    top of it, at the positions the rollout's decode used. With gradients on, they flow back
    through the gathered cache into the one prompt pass, so a group's G sequences
    cost one prompt forward and backward instead of G (an image-heavy prompt is most
    of a sequence). Same values as the full forward up to float rounding.
    """
    g = rollout.group_size
    family = family_of(base.config)
    unique, inverse = torch.unique(prompts, return_inverse=True)  # [u], [n]
    unique_mask = rollout.prompt_mask[unique]  # [u, P]
    out = base.model(
        input_ids=rollout.prompt_ids[unique],
        attention_mask=unique_mask,
        use_cache=True,
        **row_inputs(family, prompt["mm_token_type_ids"][unique], unique_mask),
        **model_inputs(family, prompt, unique * g, g, features),
    )  # last_hidden_state [u, P, H]
    cache = out.past_key_values
    cache.batch_select_indices(inverse)  # [n] sequences from here on
    delta = family.position_offset(base, unique_mask)[inverse]  # [n, 1], from the prompt pass
    prompt_mask = rollout.prompt_mask[prompts]  # [n, P]
    t = completion.shape[1]
    steps = torch.arange(t, device=completion.device)  # [T]
    positions = prompt_mask.sum(-1, keepdim=True) + steps + delta  # [n, T], as in sample_group
    hidden = base.model(
        input_ids=completion,
        attention_mask=torch.cat([prompt_mask, cmask], dim=1),  # [n, P+T]
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state  # [n, T, H]
    first = out.last_hidden_state[:, -1][inverse]  # [n, H]: the prompt's last token
    return torch.cat([first[:, None], hidden[:, :-1]], dim=1)  # [n, T, H]


def select_groups(
    family: ModelFamily, prompt: dict[str, Tensor], rollout: Rollout, groups: list[int]
) -> tuple[dict[str, Tensor], Rollout]:
    """The prompts `groups` of a batch and their G completions each, in that order."""
    g = rollout.group_size
    index = torch.tensor(groups, dtype=torch.long, device=rollout.prompt_ids.device)
    rows = (index[:, None] * g + torch.arange(g, device=index.device)).flatten()  # [n*G]
    parts = family.split_images(prompt)
    picked = {k: prompt[k][index] for k in ROW_KEYS}
    picked.update(family.join_images([parts[i] for i in images_of(prompt, groups)]))
    if "image_counts" in prompt:
        picked["image_counts"] = prompt["image_counts"][index]
    return picked, Rollout(
        prompt_ids=rollout.prompt_ids[index],
        prompt_mask=rollout.prompt_mask[index],
        completion_ids=rollout.completion_ids[rows],
        completion_mask=rollout.completion_mask[rows],
        logprobs=rollout.logprobs[rows],
        truncated=rollout.truncated[rows],
        group_size=g,
        seconds=rollout.seconds,
    )


def concat_rollouts(
    family: ModelFamily, parts: list[tuple[dict[str, Tensor], Rollout]], pad_id: int
) -> tuple[dict[str, Tensor], Rollout]:
    """One batch from several: prompts re-padded on the left, completions on the right."""
    prompts = [p for p, _ in parts]
    rollouts = [r for _, r in parts]
    merged = {
        "input_ids": _pad_cat([p["input_ids"] for p in prompts], pad_id, left=True),
        "attention_mask": _pad_cat([p["attention_mask"] for p in prompts], 0, left=True),
        "mm_token_type_ids": _pad_cat([p["mm_token_type_ids"] for p in prompts], 0, left=True),
        **family.join_images([one for p in prompts for one in family.split_images(p)]),
    }
    if any("image_counts" in p for p in prompts):
        merged["image_counts"] = torch.cat([_image_counts(p) for p in prompts])
    return merged, Rollout(
        prompt_ids=merged["input_ids"],
        prompt_mask=merged["attention_mask"],
        completion_ids=_pad_cat([r.completion_ids for r in rollouts], pad_id, left=False),
        completion_mask=_pad_cat([r.completion_mask for r in rollouts], 0, left=False),
        logprobs=_pad_cat([r.logprobs for r in rollouts], 0.0, left=False),
        truncated=torch.cat([r.truncated for r in rollouts]),
        group_size=rollouts[0].group_size,
        seconds=sum(r.seconds for r in rollouts),
    )


ROW_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")
"""A prompt batch's per-row tensors [B, P]; the rest are images and `image_counts`."""


def _pad_cat(tensors: list[Tensor], value: float, left: bool) -> Tensor:
    width = max(t.shape[1] for t in tensors)
    padded = []
    for t in tensors:
        fill = t.new_full((t.shape[0], width - t.shape[1]), value)  # [n, width - T_i]
        padded.append(torch.cat([fill, t] if left else [t, fill], dim=1))  # [n, width]
    return torch.cat(padded)  # [sum n, width]


def group_keys(seed: int, step: int, attempt: int, ids: list[str], group_size: int) -> Tensor:
    """Sampling keys of B groups of G completions -> [B*G] int64 (32-bit values).

    A pure function of (seed, training step, attempt, sample id, member): the rows a
    process samples do not depend on which other prompts share its batch, so 1 and
    N processes (or a resumed run) draw the same completions for a sample. `attempt`
    separates the extra rollouts of dynamic sampling within one step.
    """
    import zlib

    keys = []
    for sample_id in ids:
        prompt = zlib.crc32(f"{seed}\x1f{step}\x1f{attempt}\x1f{sample_id}".encode())
        keys += [(prompt + member * 0x9E3779B9) & 0xFFFFFFFF for member in range(group_size)]
    return torch.tensor(keys, dtype=torch.long)


def _image_counts(prompt: dict[str, Tensor]) -> Tensor:
    """[B] images per prompt (one each when the batch does not say)."""
    if "image_counts" in prompt:
        return prompt["image_counts"]
    return torch.ones(prompt["input_ids"].shape[0], dtype=torch.long)
