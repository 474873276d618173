"""The CLIP reward: how well the response's image description matches the image.

The paper's Stage 1 CLIP term (docs/paper.md, "Stage 1 reward"): the cosine
similarity s between the image and the text of the "### Image Description:" section
(up to "### Rationales:"), scored min(1, s / 0.4). A response without the section
scores the empty caption, as the paper's code does. We also clamp at 0, so a
negative similarity scores 0 rather than below it.

Two backends:
- "open_clip" (default): any open_clip model, by architecture and pretrained tag
  (`model: ViT-B-32`, `pretrained: laion2b_s34b_b79k`), by architecture and local
  checkpoint file (`pretrained: /path/ckpt.pt`), or by `local-dir:`/`hf-hub:` name.
  A name registered in the `pebr_lightning.clip_models` entry-point group loads from
  the folder it names; the default model is the demo's `tiny-clip`, a toy CLIP trained
  on the synthetic shapes (pebr_demo/models/tiny_clip.py), so the CPU demo needs no
  download.
- "fgclip": FG-CLIP through transformers, as the paper (image resized to 336x336,
  text padded/truncated to 248 tokens, the long-text path). Its checkpoints ship
  their own model code, so it runs only with `trust_remote_code: true`.

The model loads on the first call, on `context["device"]`, and is dropped when the
reward is pickled. Each distinct image of a batch is encoded once: a GRPO batch holds
G completions per image, keyed by the sample's image path.

Departure from the paper's code: a scorer that fails raises instead of scoring 0;
the reward's `on_error: none` setting turns such a failure into "not applicable".

Try it on real samples: `pebr rewards check clip_score`.
"""

from __future__ import annotations

import os
from os import PathLike
from typing import Any, Literal

from pebr_lightning import entry_points
from pebr_lightning.data.images import image_paths
from pebr_lightning.errors import PebrError
from pebr_lightning.rewards.answers import description_section
from pebr_lightning.rewards.protocol import RewardOutput

PAPER_SCALE = 0.4
FGCLIP_DEFAULT = "qihoo360/fg-clip-large"
FGCLIP_TEXT_TOKENS = 248  # FG-CLIP's long-text position table
BACKENDS = ("open_clip", "fgclip")
OPEN_CLIP_DEFAULT = "tiny-clip"  # the demo's, through the clip_models entry point


def clip_reward(similarity: float, scale: float = PAPER_SCALE) -> float:
    """The paper's min(1, s / scale), clamped at 0 below."""
    return min(1.0, max(0.0, similarity / scale))


class ClipScoreReward:
    """Scores image-description agreement: min(1, max(0, s / scale)), s the CLIP cosine.

    s is the cosine similarity between the image and the response's "### Image
    Description:" section (the empty caption when the section is missing). Component:
    `similarity`, the raw s. A sample with several images is scored against its first
    (the context's `images`): one CLIP embedding cannot say whether one description
    covers two pictures; a reward that needs that reads `image_lists`.
    """

    name = "clip_score"

    def __init__(
        self,
        backend: Literal["open_clip", "fgclip"] = "open_clip",
        model: str | None = None,
        pretrained: str | None = None,
        scale: float = PAPER_SCALE,
        batch_size: int = 32,
        trust_remote_code: bool = False,
        fgclip_image_size: int = 336,
    ) -> None:
        """
        Args:
            backend: "open_clip" (any open_clip model) or "fgclip" (FG-CLIP through
                transformers, as the paper).
            model: open_clip: an architecture name (`ViT-B-32`), a `local-dir:` or
                `hf-hub:` name, or `tiny-clip` (default, the embedded toy CLIP);
                fgclip: a hub id or local folder (default `qihoo360/fg-clip-large`).
            pretrained: open_clip only: a pretrained tag (`laion2b_s34b_b79k`) or a
                local checkpoint file for the architecture `model`.
            scale: the similarity that scores 1 (the paper: 0.4).
            batch_size: images or texts encoded per forward pass.
            trust_remote_code: fgclip only: allow running the model code that the
                FG-CLIP checkpoint ships (required by FG-CLIP).
            fgclip_image_size: fgclip only: side the image is resized to (336 for
                fg-clip-large, as the paper; 224 for fg-clip-base).
        """
        if backend not in BACKENDS:
            raise ValueError(f"clip_score: backend must be one of {BACKENDS}, got {backend!r}")
        if not scale > 0:
            raise ValueError(f"clip_score: scale must be positive, got {scale}")
        if batch_size < 1:
            raise ValueError(f"clip_score: batch_size must be at least 1, got {batch_size}")
        if model is None:
            model = OPEN_CLIP_DEFAULT if backend == "open_clip" else FGCLIP_DEFAULT
        if backend == "fgclip" and not trust_remote_code:
            raise PebrError(
                f"clip_score: backend 'fgclip' loads {model!r}, whose checkpoint ships its own "
                "Python model code that transformers runs only with trust_remote_code. Set "
                "`trust_remote_code: true` in this reward's init_args if you trust that "
                "repository, or use `backend: open_clip`."
            )
        if backend == "fgclip" and pretrained is not None:
            raise ValueError("clip_score: `pretrained` is for backend 'open_clip' only")
        if (
            backend == "open_clip"
            and pretrained is not None
            and model in entry_points.names(entry_points.CLIP_MODELS)
        ):
            raise ValueError(f"clip_score: {model} has its own weights; drop `pretrained`")
        self.backend = backend
        self.model = model
        self.pretrained = pretrained
        self.scale = scale
        self.batch_size = batch_size
        self.trust_remote_code = trust_remote_code
        self.fgclip_image_size = fgclip_image_size
        self._scorer: _OpenClipScorer | _FgClipScorer | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the settings only; the model reloads on first use in the new process."""
        state = self.__dict__.copy()
        state["_scorer"] = None
        return state

    def __call__(
        self, *, completions: list[str], samples: list[dict[str, Any]], **context: Any
    ) -> RewardOutput:
        captions = [description_section(text) for text in completions]
        images = context.get("images")
        if images is None:
            images = [_open_image(image_paths(sample)[0]) for sample in samples]
        if not (len(captions) == len(samples) == len(images)):
            raise ValueError(
                f"clip_score: {len(completions)} completions, {len(samples)} samples and "
                f"{len(images)} images; they must align"
            )
        keys = [_image_key(sample, image) for sample, image in zip(samples, images, strict=True)]
        similarity = self._similarities(captions, images, keys, context.get("device"))
        scores: list[float | None] = [clip_reward(s, self.scale) for s in similarity]
        return RewardOutput(scores=scores, components={"similarity": list(similarity)})

    def _similarities(
        self, captions: list[str], images: list[Any], keys: list[Any], device: Any
    ) -> list[float]:
        """Cosine similarity of each caption with its image, each distinct image encoded once."""
        import torch

        scorer = self._load(device)
        first_of: dict[Any, int] = {}
        distinct: list[Any] = []
        for key, image in zip(keys, images, strict=True):
            if key not in first_of:
                first_of[key] = len(distinct)
                distinct.append(image)
        which = [first_of[key] for key in keys]
        size = self.batch_size
        with torch.no_grad():
            image_emb = torch.cat(
                [scorer.encode_images(chunk) for chunk in _chunks(distinct, size)]
            )  # [U, E], U distinct images
            text_emb = torch.cat(
                [scorer.encode_texts(chunk) for chunk in _chunks(captions, size)]
            )  # [N, E]
            sims = (image_emb[which] * text_emb).sum(dim=-1)  # [N]
        return sims.float().cpu().tolist()

    def _load(self, device: Any) -> _OpenClipScorer | _FgClipScorer:
        """The scorer on `device` (default CPU), loaded on first use."""
        import torch

        device = torch.device(device if device is not None else "cpu")
        if self._scorer is None:
            if self.backend == "fgclip":
                self._scorer = _FgClipScorer.load(
                    self.model, device, self.trust_remote_code, self.fgclip_image_size
                )
            else:
                self._scorer = _OpenClipScorer.load(self.model, self.pretrained, device)
        elif self._scorer.device != device:
            self._scorer.to(device)
        return self._scorer


class _OpenClipScorer:
    """Normalised image and text embeddings from an open_clip model."""

    def __init__(self, model: Any, preprocess: Any, tokenizer: Any, device: Any) -> None:
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device

    @classmethod
    def load(cls, name: str, pretrained: str | None, device: Any) -> _OpenClipScorer:
        import open_clip

        if name in entry_points.names(entry_points.CLIP_MODELS):
            make = entry_points.load(entry_points.CLIP_MODELS, name, "CLIP model")
            name = f"local-dir:{make(name)}"
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, device=device
            )
            tokenizer = open_clip.get_tokenizer(name)
        except (RuntimeError, FileNotFoundError, ValueError) as err:
            raise PebrError(
                f"clip_score: open_clip cannot load model {name!r} with pretrained "
                f"{pretrained!r}: {err}"
            ) from err
        return cls(model, preprocess, tokenizer, device)

    def to(self, device: Any) -> None:
        self.model.to(device)
        self.device = device

    def encode_images(self, images: list[Any]) -> Any:
        import torch
        import torch.nn.functional as F

        pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device)
        return F.normalize(self.model.encode_image(pixels).float(), dim=-1)  # [n, E]

    def encode_texts(self, texts: list[str]) -> Any:
        import torch.nn.functional as F

        tokens = self.tokenizer(texts).to(self.device)  # [n, context_length]
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)  # [n, E]


class _FgClipScorer:
    """Normalised embeddings from FG-CLIP's long-text path (the paper's scorer)."""

    def __init__(
        self, model: Any, tokenizer: Any, image_processor: Any, device: Any, image_size: int
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.device = device
        self.image_size = image_size

    @classmethod
    def load(
        cls, path: str, device: Any, trust_remote_code: bool, image_size: int
    ) -> _FgClipScorer:
        from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer

        from pebr_lightning.models.policy import check_model_folder

        check_model_folder(path, "clip_score: fgclip model")
        path = os.path.expanduser(path)
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        return cls(model.to(device), tokenizer, processor, device, image_size)

    def to(self, device: Any) -> None:
        self.model.to(device)
        self.device = device

    def encode_images(self, images: list[Any]) -> Any:
        import torch.nn.functional as F

        side = self.image_size
        from pebr_lightning.data.images import to_rgb

        resized = [to_rgb(image).resize((side, side)) for image in images]
        pixels = self.image_processor(images=resized, return_tensors="pt")["pixel_values"]
        dtype = next(self.model.parameters()).dtype
        pixels = pixels.to(self.device, dtype=dtype)  # [n, 3, side, side]
        return F.normalize(self.model.get_image_features(pixels).float(), dim=-1)  # [n, E]

    def encode_texts(self, texts: list[str]) -> Any:
        import torch.nn.functional as F

        ids = self.tokenizer(
            texts,
            max_length=FGCLIP_TEXT_TOKENS,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        )["input_ids"].to(self.device)  # [n, 248]
        features = self.model.get_text_features(ids, walk_short_pos=False)
        return F.normalize(features.float(), dim=-1)  # [n, E]


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _image_key(sample: dict[str, Any], image: Any) -> Any:
    """What identifies an image within a batch: its path, else the image object itself."""
    path = sample.get("image") or (image_paths(sample) or [None])[0]
    if isinstance(path, (str, PathLike)):
        return ("path", str(path))
    return ("object", id(image))


def _open_image(path: str | PathLike) -> Any:
    from pebr_lightning.data.images import load_image

    return load_image(path)
