"""`tiny-gemma3`: the Gemma 3 architecture at toy size, the second model family.

Why Gemma 3 as the second family: its images work unlike Qwen's in every respect the
pipeline touches. Each image is resized to one square and becomes a fixed number of
soft tokens (`mm_tokens_per_image`, between `<start_of_image>` and `<end_of_image>`)
instead of a variable number of merged patches; positions are 1-D (no multimodal RoPE,
no `rope_deltas`), so a left-padded prompt needs its own positions; image tokens attend
to each other both ways (from `token_type_ids`); and its vision tower and projector are
`vision_tower` / `multi_modal_projector`, not `visual`. SmolVLM (Idefics3) and
LLaVA-OneVision split an image into a variable grid of crops, which adds a second axis
to what Gemma 3 already tests, at more cost per CPU step.

Built as `tiny.py` builds the Qwen model: a byte-level BPE trained on the synthetic
shapes corpus with Gemma's special tokens and a Gemma-style chat template, a random-init
model from a small config (fixed seed), saved once to the cache folder and loaded from
there like any checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from pebr_demo.models.tiny import SEED, build_once, train_tokenizer
from pebr_lightning.files import cache_dir

NAME = "tiny-gemma3"
# Bump when the recipe changes, so stale cache folders are never reused.
RECIPE_VERSION = 2
IMAGE_SIZE = 112
SOFT_TOKENS = 16  # 112 px / 14 px patches = 8 x 8, pooled 2 x 2 -> 4 x 4 per image

GEMMA_SPECIAL_TOKENS = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
)

# Gemma's turn layout (user / model turns, one `<start_of_image>` per image, which the
# processor expands), written as our own Jinja template. A system turn is rendered
# as its own turn; Gemma's own template folds it into the first user turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<start_of_image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def ensure_tiny_gemma3(name: str = NAME) -> Path:
    """Folder of the saved `tiny-gemma3`, built on first use (a few seconds on CPU)."""
    if name != NAME:
        raise ValueError(f"{__name__} builds {NAME!r}, not {name!r}")
    return build_once(cache_dir() / f"{NAME}-r{RECIPE_VERSION}", build_tiny_gemma3)


def build_tiny_gemma3(out_dir: Path) -> None:
    """Train the tokenizer, build the random-init model and save both to `out_dir`."""
    import torch
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
        GenerationConfig,
    )

    tokenizer = train_tokenizer(
        640,
        GEMMA_SPECIAL_TOKENS,
        CHAT_TEMPLATE,
        bos_token="<bos>",
        eos_token="<end_of_turn>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )
    # Gemma's vocabulary holds runs of one to four newlines as single tokens, and vLLM's
    # Gemma 3 processor looks them up by their text when it expands an image; byte-level
    # BPE spells them otherwise, so they are added as they are.
    from tokenizers import AddedToken

    tokenizer.add_tokens([AddedToken("\n" * n, normalized=False) for n in (4, 3, 2, 1)])
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in GEMMA_SPECIAL_TOKENS}
    config = Gemma3Config(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "max_position_embeddings": 4096,
            "sliding_window": 512,
            "bos_token_id": ids["<bos>"],
            "eos_token_id": ids["<end_of_turn>"],
            "pad_token_id": ids["<pad>"],
        },
        vision_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": IMAGE_SIZE,
            "patch_size": 14,
        },
        mm_tokens_per_image=SOFT_TOKENS,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(SEED)
    model = Gemma3ForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[ids["<end_of_turn>"], ids["<eos>"]],
        pad_token_id=ids["<pad>"],
        bos_token_id=ids["<bos>"],
    )
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        image_seq_length=SOFT_TOKENS,
    )
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
