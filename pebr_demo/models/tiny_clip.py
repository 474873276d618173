"""The embedded CLIP scorer: a toy open_clip model trained on the synthetic shapes.

The paper scores a description with FG-CLIP large; the CPU demo cannot download it,
so `tiny-clip` stands in. It is a standard open_clip `CLIP` (ViT image tower, causal
text transformer, open_clip's bundled BPE tokenizer, 77-token context) at toy size,
trained contrastively for ~400 steps on (image, description) pairs from
`pebr_demo.data.synth`, with one hard negative per image (the same description
with one shape's colour or kind changed, a shape added or dropped, or two shapes
swapped), so that it prefers the right description of the right image.

Departures from a plain CLIP recipe: the temperature is fixed and a penalty keeps the
cosine of a matching pair near 0.35. A real CLIP's matching cosines sit around 0.3,
which is what the paper's reward `min(1, s / 0.4)` is scaled for; left alone, the toy
model pushes them to ~0.9 and every description would score 1. A second penalty
keeps the empty caption (what the reward scores when the description section is
missing) below cosine 0 for every image, so leaving the description out scores 0
instead of the ~0.6 an untreated model gave it: more than a wrong description.

It is trained once into `$PEBR_CACHE/tiny-clip-r<version>/` as an open_clip
"local-dir" folder (`open_clip_config.json` + `open_clip_model.safetensors`) and
loaded from there with open_clip's own factory, the path any local checkpoint takes.
That first build (about a minute) says so on stderr, with a progress bar over its
training steps; later loads print nothing.

    open_clip.create_model_and_transforms(f"local-dir:{ensure_tiny_clip()}")
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pebr_lightning.files import cache_dir, use_default_modes

TINY_CLIP = "tiny-clip"
# Bump when the recipe changes, so stale cache folders are never reused.
RECIPE_VERSION = 4
SEED = 0
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"

_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class TinyClipRecipe:
    """Sizes and training settings of the embedded CLIP (defaults: ~3.4 M parameters)."""

    image_size: int = 112
    """Side of the square input; the synthetic pictures are 112 px, so nothing is resampled."""
    patch_size: int = 16
    """49 patches per image; smaller patches cost more per step for no measured gain."""
    width: int = 64
    """Width of both towers (attention heads of 32)."""
    layers: int = 2
    """Depth of both towers."""
    embed_dim: int = 64
    """Size of the shared image/text embedding."""
    steps: int = 400
    """Optimizer steps (~50 s on one CPU thread)."""
    batch_size: int = 64
    """Images per step; each brings its description and one hard negative."""
    train_images: int = 3000
    """Distinct synthetic samples (seed 0) drawn from during training."""
    lr: float = 2e-3
    """Peak AdamW learning rate (one-cycle schedule); 4e-3 collapsed in a measured run."""
    logit_scale: float = 50.0
    """Fixed inverse temperature of the contrastive loss."""
    target_similarity: float = 0.35
    """Matching cosines above this are penalised, keeping the scale of real CLIP scores."""
    empty_similarity: float = 0.0
    """The empty caption's cosines above this are penalised: saying nothing scores ~0."""


def clip_folder(name: str) -> Path:
    """The core's CLIP-model hook (entry-point group `pebr_lightning.clip_models`):
    `tiny-clip` -> the folder `ensure_tiny_clip` builds."""
    if name != TINY_CLIP:
        raise ValueError(f"pebr_demo ships one CLIP model, {TINY_CLIP!r}, not {name!r}")
    return ensure_tiny_clip()


def ensure_tiny_clip(recipe: TinyClipRecipe = TinyClipRecipe()) -> Path:
    """Folder of the trained embedded CLIP, training it on first use (~1 minute on CPU).

    The first use prints one line to stderr (what is built, where, for how long) and a
    progress bar over the training steps. Built under a temporary name and renamed
    into place, so a crash mid-build never leaves a half folder, and concurrent first
    uses end with the same complete folder. Another `recipe` (a smaller one in tests)
    is kept in a folder of its own, never in the default one.
    """
    target = cache_dir() / folder_name(recipe)
    if (target / CONFIG_FILE).is_file():
        return target
    print(
        f"{TINY_CLIP}: building the embedded CLIP once into {target}"
        f" ({recipe.steps} training steps on one CPU thread, {_estimate(recipe)};"
        " later runs load it)",
        file=sys.stderr,
        flush=True,
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{TINY_CLIP}-", dir=target.parent))
    try:
        build_tiny_clip(scratch, recipe, progress=True)
        use_default_modes(scratch)  # mkdtemp gives 0o700, safetensors 0o600
        try:
            os.replace(scratch, target)
        except OSError:
            if not (target / CONFIG_FILE).is_file():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def folder_name(recipe: TinyClipRecipe) -> str:
    """`tiny-clip-r<version>` for the default recipe; another one adds a hash of itself."""
    name = f"{TINY_CLIP}-r{RECIPE_VERSION}"
    if recipe == TinyClipRecipe():
        return name
    text = json.dumps(asdict(recipe), sort_keys=True)
    return f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def open_clip_config(recipe: TinyClipRecipe) -> dict:
    """The `open_clip_config.json` content (open_clip's local-dir / hub layout)."""
    return {
        "model_cfg": {
            "embed_dim": recipe.embed_dim,
            "vision_cfg": {
                "image_size": recipe.image_size,
                "patch_size": recipe.patch_size,
                "width": recipe.width,
                "layers": recipe.layers,
                "head_width": 32,
            },
            "text_cfg": {
                "context_length": 77,
                "vocab_size": 49408,  # open_clip's bundled BPE vocabulary
                "width": recipe.width,
                "heads": recipe.width // 32,
                "layers": recipe.layers,
            },
        },
        "preprocess_cfg": {
            "size": recipe.image_size,
            "mean": list(_OPENAI_MEAN),
            "std": list(_OPENAI_STD),
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }


def build_tiny_clip(
    out_dir: Path, recipe: TinyClipRecipe = TinyClipRecipe(), progress: bool = False
) -> dict:
    """Train the toy CLIP and save it to `out_dir`; return the training record.

    `progress` shows a bar over the training steps on stderr. Runs on one CPU thread,
    whatever the machine: the weights then do not depend on the core count, and at
    width 64 the matrices are too small to split well. On a 2-core machine two threads
    were 1.5x faster per step when idle but 3-4x slower with another process running
    (as when tests or other jobs share the machine).
    """
    import torch
    from safetensors.torch import save_file

    config = open_clip_config(recipe)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():  # leave the caller's random state alone
            torch.manual_seed(SEED)
            model, record = _train(config, recipe, progress)
    finally:
        torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, out_dir / WEIGHTS_FILE)
    record = {"recipe": asdict(recipe), "recipe_version": RECIPE_VERSION, **record}
    (out_dir / "training.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    # Written last: its presence marks a complete folder.
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return record


def perturb_description(shapes: list[dict], rng: random.Random) -> str:
    """A description of the scene with one thing wrong: a colour, a kind, the count or the order."""
    from pebr_demo.data.synth import COLOURS, SHAPE_KINDS, describe

    shapes = [dict(s) for s in shapes]
    i = rng.randrange(len(shapes))
    change = rng.choice(("colour", "colour", "kind", "kind", "count", "order"))
    names = [(s["colour"], s["kind"]) for s in shapes]
    others = [k for k in range(len(shapes)) if names[k] != names[i]]
    if change == "order" and others:  # swap with a shape of another name, or nothing changes
        k = rng.choice(others)
        shapes[i], shapes[k] = shapes[k], shapes[i]
    elif change == "count" and len(shapes) > 1 and rng.random() < 0.5:
        del shapes[i]
    elif change == "count":
        new = {"kind": rng.choice(SHAPE_KINDS), "colour": rng.choice(COLOURS)}
        shapes.insert(rng.randrange(len(shapes) + 1), new)
    elif change == "kind":
        shapes[i]["kind"] = rng.choice([k for k in SHAPE_KINDS if k != shapes[i]["kind"]])
    else:
        shapes[i]["colour"] = rng.choice([c for c in COLOURS if c != shapes[i]["colour"]])
    return describe(shapes)


def encode_text_prefix(model, tokens, token_embedding=None):
    """`model.encode_text(tokens)` computed on the tokens' non-padding prefix only.

    With a causal mask and end-of-text pooling, the padding after the end token cannot
    change the pooled feature, so training drops it (33 of 77 positions are used by the
    longest description: 2.3x less text compute). `token_embedding` replaces the
    model's table (a compact one indexed by remapped ids during training); `tokens`
    keep the original ids, whose argmax marks the end token.
    """
    import torch.nn.functional as F

    length = int((tokens != 0).sum(1).max())
    ids = tokens[:, :length]  # [B, L]
    table = model.token_embedding.weight if token_embedding is None else token_embedding[0]
    lookup = ids if token_embedding is None else token_embedding[1][ids]
    x = F.embedding(lookup, table) + model.positional_embedding[:length]  # [B, L, W]
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    pooled = x[range(x.shape[0]), ids.argmax(dim=-1)]  # [B, W]
    return pooled @ model.text_projection  # [B, E]


def _estimate(recipe: TinyClipRecipe) -> str:
    """Rough build time on one CPU thread, from the measured ~2 ms per image prepared
    and ~0.15 s per step of 64 (docs/BENCHMARKS.md), plus start-up."""
    seconds = 5 + 0.002 * recipe.train_images + 0.15 * recipe.steps * recipe.batch_size / 64
    if seconds < 100:
        return f"about {max(10, round(seconds, -1)):.0f} s"
    return f"about {seconds / 60:.0f} min"


def _train(config: dict, recipe: TinyClipRecipe, progress: bool):
    import open_clip
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from pebr_demo.data.synth import synth_records

    started = time.perf_counter()
    model = open_clip.CLIP(**config["model_cfg"])
    tokenizer = open_clip.SimpleTokenizer(context_length=77)
    pp = config["preprocess_cfg"]
    preprocess = open_clip.image_transform(
        pp["size"],
        is_train=False,
        mean=pp["mean"],
        std=pp["std"],
        resize_mode=pp["resize_mode"],
        interpolation=pp["interpolation"],
    )
    rng = random.Random(f"tiny-clip-{SEED}")
    pixels, positives, negatives = [], [], []
    for record, image in synth_records(recipe.train_images, SEED):
        pixels.append(preprocess(image))
        positives.append(record["description"])
        negatives.append(perturb_description(record["shapes"], rng))
    pixels = torch.stack(pixels)  # [N, 3, S, S]
    tokens = tokenizer([*positives, *negatives, ""])  # [2N + 1, 77], the empty caption last
    # Only a few dozen BPE ids occur in the synthetic text: train a compact table of
    # those rows rather than updating all 49,408 (most of the model) every step.
    used = torch.unique(tokens)
    remap = torch.zeros(model.vocab_size, dtype=torch.long)
    remap[used] = torch.arange(len(used))
    compact = torch.nn.Parameter(model.token_embedding.weight.detach()[used].clone())
    model.token_embedding.weight.requires_grad_(False)
    model.logit_scale.data.fill_(math.log(recipe.logit_scale))
    model.logit_scale.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad] + [compact]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=recipe.lr, total_steps=recipe.steps, pct_start=0.1
    )
    n, b = len(positives), recipe.batch_size
    generator = torch.Generator().manual_seed(SEED)
    labels = torch.arange(b)
    prepared = time.perf_counter()
    model.train()
    # Into a log file (no terminal) every redraw is kept: one line in 15 s, not 8 a second.
    steps = tqdm(
        range(recipe.steps),
        desc=TINY_CLIP,
        unit="step",
        file=sys.stderr,
        disable=not progress,
        mininterval=0.1 if sys.stderr.isatty() else 15.0,
    )
    for _ in steps:
        idx = torch.randint(0, n, (b,), generator=generator)  # [b]
        # Descriptions, their hard negatives, then the empty caption: [2b + 1, 77].
        text = tokens[torch.cat([idx, idx + n, torch.tensor([2 * n])])]
        image_emb = F.normalize(model.encode_image(pixels[idx]), dim=-1)  # [b, E]
        text_emb = F.normalize(encode_text_prefix(model, text, (compact, remap)), dim=-1)
        sims = image_emb @ text_emb.T  # [b, 2b + 1]
        logits = recipe.logit_scale * sims
        loss = F.cross_entropy(logits, labels) + F.cross_entropy(logits[:, :b].T, labels)
        too_close = F.relu(sims.diagonal() - recipe.target_similarity)  # [b]
        empty_too_close = F.relu(sims[:, -1] - recipe.empty_similarity)  # [b]
        loss = loss + 1000.0 * (too_close.pow(2).mean() + empty_too_close.pow(2).mean())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    with torch.no_grad():
        model.token_embedding.weight[used] = compact
    finished = time.perf_counter()
    return model, {
        "prepare_seconds": round(prepared - started, 1),
        "train_seconds": round(finished - prepared, 1),
        "final_loss": round(loss.item(), 4),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
