"""The embedded default model: the real Qwen2.5-VL architecture at toy size.

`tiny-qwen2.5-vl` needs no download: a byte-level BPE tokenizer is trained on the
synthetic shapes corpus (with Qwen's special tokens and a Qwen-style chat
template), a Qwen2.5-VL model is built from a small config with random weights
(fixed seed), and both are saved once to a cache folder. From then on the model is
loaded through the same `from_pretrained` path as a real checkpoint, so every code
path the project runs on it is the one a real Qwen2.5-VL takes.

Sizes: "xs" (text 128 wide x 2 layers, vision 64 wide x 2 blocks, ~0.6 M
parameters) learned the shapes task as well per CPU second as 1.7 M and 3.7 M
variants when measured: those take fewer steps in the same time. The cache folder
is `$PEBR_CACHE` or `~/.cache/pebr_lightning`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pebr_lightning.errors import PebrError
from pebr_lightning.files import cache_dir, use_default_modes

# Qwen2-VL / Qwen2.5-VL special tokens, in Qwen's order, so ids line up the same way.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# The Qwen chat layout (im_start/im_end turns, vision_start + image_pad + vision_end
# per image), written as our own Jinja template. No default system turn: it would
# cost the tiny model ~10 tokens per sample and carry no information.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    """Sizes of one embedded toy model."""

    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_intermediate: int
    vision_hidden: int
    vision_depth: int
    vision_heads: int
    vision_intermediate: int
    vocab_size: int
    image_pixels: int
    """Largest image area the processor keeps; 112x112 gives 16 image tokens after the 2x2 merge."""


TINY_MODELS: dict[str, TinySpec] = {
    "tiny-qwen2.5-vl": TinySpec(
        text_hidden=128,
        text_layers=2,
        text_heads=4,
        text_kv_heads=2,
        text_intermediate=256,
        vision_hidden=64,
        vision_depth=2,
        vision_heads=4,
        vision_intermediate=128,
        vocab_size=640,
        image_pixels=112 * 112,
    ),
    # A larger random-init variant for benchmarks (~9 M parameters).
    "tiny-qwen2.5-vl-m": TinySpec(
        text_hidden=384,
        text_layers=4,
        text_heads=6,
        text_kv_heads=2,
        text_intermediate=1024,
        vision_hidden=192,
        vision_depth=4,
        vision_heads=6,
        vision_intermediate=512,
        vocab_size=640,
        image_pixels=112 * 112,
    ),
}

# Bump when the recipe changes, so stale cache folders are never reused.
RECIPE_VERSION = 4
SEED = 0


def is_tiny_name(name: str) -> bool:
    return name in TINY_MODELS


def ensure_tiny_model(name: str = "tiny-qwen2.5-vl") -> Path:
    """Path of the saved embedded model `name`, building it on first use.

    The folder is built under a temporary name and renamed into place, so a crash
    mid-build never leaves a half folder, and concurrent first uses (two test
    workers, two ranks) both end with the same complete folder.
    """
    spec = TINY_MODELS[name]
    return build_once(
        cache_dir() / f"{name}-r{RECIPE_VERSION}", lambda out: build_tiny_model(out, spec)
    )


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """`target`, written by `build(folder)` into a scratch folder beside it on first use
    and renamed into place (a crash never leaves half a folder; of concurrent first
    uses, the first rename wins and the others use its folder)."""
    name = target.name
    if _complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build(scratch)
        if not _complete(scratch):
            # Once a process group is up, transformers writes a model's own files on
            # rank 0 only: another rank's build holds just the processor. Renamed into
            # place it would be a broken cache for everyone; wait for rank 0's instead.
            return _wait_for(target)
        use_default_modes(scratch)  # mkdtemp gives 0o700, safetensors 0o600
        try:
            os.replace(scratch, target)
        except OSError:
            if not _complete(target):  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def _wait_for(target: Path, timeout_s: float = 600.0) -> Path:
    import time

    deadline = time.monotonic() + timeout_s
    while not _complete(target):
        if time.monotonic() > deadline:
            raise PebrError(
                f"{target}: the embedded model was not written by rank 0 within {timeout_s:.0f} s"
                " (this process cannot write it: transformers saves on rank 0 only)"
            )
        time.sleep(0.2)
    return target


def build_tiny_model(out_dir: Path, spec: TinySpec) -> None:
    """Train the tokenizer, build the random-init model and save both to `out_dir`."""
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
    )
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tokenizer = train_tokenizer(spec.vocab_size)
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in QWEN_SPECIAL_TOKENS}
    head_dim = spec.text_hidden // spec.text_heads
    # Multimodal RoPE splits head_dim/2 frequencies over (time, height, width) in
    # Qwen's 2:3:3 ratio (16:24:24 in the 7B model).
    half = head_dim // 2
    mrope = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": spec.text_hidden,
            "intermediate_size": spec.text_intermediate,
            "num_hidden_layers": spec.text_layers,
            "num_attention_heads": spec.text_heads,
            "num_key_value_heads": spec.text_kv_heads,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "mrope_section": mrope, "rope_theta": 1e4},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": spec.vision_depth,
            "hidden_size": spec.vision_hidden,
            "intermediate_size": spec.vision_intermediate,
            "num_heads": spec.vision_heads,
            "out_hidden_size": spec.text_hidden,
            "window_size": 112,
            "fullatt_block_indexes": [spec.vision_depth - 1],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(SEED)
    model = Qwen2_5_VLForConditionalGeneration(config)
    # Instruct checkpoints stop on either end token; copy that convention.
    model.generation_config = GenerationConfig(
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"],
    )
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            min_pixels=56 * 56, max_pixels=spec.image_pixels, patch_size=14, merge_size=2
        ),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def train_tokenizer(
    vocab_size: int,
    special_tokens: tuple[str, ...] = QWEN_SPECIAL_TOKENS,
    chat_template: str = CHAT_TEMPLATE,
    **tokens: Any,
):
    """A byte-level BPE trained on the synthetic corpus plus the PeBR prompt text.

    Byte-level keeps every string encodable (a user's own question included);
    the merges make the task's words one or two tokens each.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from pebr_demo.data.synth import corpus_texts
    from pebr_lightning.data.prompts import PEBR_INSTRUCTION, render_response

    texts = list(corpus_texts(2000, seed=SEED))
    # The fixed prompt/format text appears in every sample, so weigh it like the corpus.
    texts += [PEBR_INSTRUCTION, render_response("3", "d", "r", ["s", "t"])] * 500
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    # Qwen's eos/pad unless the caller names its family's (`tokens`: eos_token, ...).
    tokens = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", **tokens}
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        chat_template=chat_template,
        model_max_length=4096,
        padding_side="right",
        **tokens,
    )
