"""The model-family contract and its lookup.

A prompt batch holds rows (`input_ids`, `attention_mask` and the family's per-token
modality ids, all [B, P]) and images (the family's `image_keys`, e.g. Qwen's flat
patches and their grids, Gemma 3's [n, 3, H, W] pixels), with `image_counts` [B]
when a prompt holds other than one image. What tells families apart:

- how a batch's images split into one entry per image and join back (selecting and
  concatenating prompt groups, encoding only some prompts' images);
- how the vision tower encodes them and how precomputed features go back into a
  forward (`mm_encoder_outputs`), so a GRPO step encodes each image once;
- positions: Qwen's multimodal RoPE computes its own in the prefill and continues
  text from an offset (`rope_deltas`); Gemma 3 takes 1-D positions, which must skip a
  left-padded prompt's padding;
- the keyword of the per-token modality ids (`mm_token_type_ids` / `token_type_ids`),
  the names of the vision modules (frozen, left unquantized, sharded on their own),
  the tokens that end a turn, and one image as prompt text for a remote engine.

A family is a class registered under the entry-point group `pebr_lightning.families`
by the transformers `model_type` it serves; a package of yours adds one the same way
(docs/architecture.md, "How to add a model family").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from pebr_lightning import entry_points
from pebr_lightning.errors import PebrError

GROUP = "pebr_lightning.families"


@runtime_checkable
class ModelFamily(Protocol):
    vision_modules: tuple[str, ...]
    """Names of the vision tower and its projector under `model.` (`visual`)."""
    token_type_key: str
    """The forward's keyword for the per-token modality ids (0 text, 1 image)."""
    image_keys: tuple[str, ...]
    """The batch keys that hold image inputs."""
    placeholder: str
    """One image in a prompt sent as text (a remote engine expands it)."""
    end_tokens: tuple[str, ...]
    """Tokens that end an assistant turn (sampling stops on them)."""

    def split_images(self, images: Mapping[str, Tensor]) -> list[dict[str, Tensor]]:
        """A batch's image inputs -> one mapping per image, in the processor's order."""
        ...

    def join_images(self, parts: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        """Per-image inputs -> the batch's image inputs, in that order (inverse of split)."""
        ...

    def encode_images(self, base: nn.Module, images: Mapping[str, Tensor]) -> list[Tensor]:
        """One vision-tower pass -> each image's features, as the language model takes them."""
        ...

    def feature_inputs(
        self, images: Mapping[str, Tensor], features: Sequence[Tensor]
    ) -> dict[str, Any]:
        """Forward keywords that put precomputed `features` of `images` in place."""
        ...

    def positions(self, attention_mask: Tensor) -> dict[str, Tensor]:
        """Forward keywords for the positions of a full (prefill) pass; {} where the
        model computes them itself."""
        ...

    def position_offset(self, base: nn.Module, attention_mask: Tensor) -> Tensor:
        """[B, 1]: after a prefill of B prompts, what to add to the count of real tokens
        so far to get the position of the next one."""
        ...

    def collapse_placeholders(self, text: str) -> str:
        """A chat-templated prompt whose images the processor expanded -> the same text
        with one `placeholder` per image."""
        ...


def registered_families() -> dict[str, str]:
    """model_type -> the family class path the installed distributions register (this
    project's own registration wins over a plugin's for the same model_type)."""
    return {name: ep.value for name, ep in entry_points.builtin_first(GROUP).items()}


_cache: dict[str, ModelFamily] = {}


def family_of(config: Any) -> ModelFamily:
    """The family of a model, by its transformers config's `model_type` (cached)."""
    model_type = getattr(config, "model_type", None)
    if model_type in _cache:
        return _cache[model_type]
    entries = entry_points.builtin_first(GROUP)
    if model_type not in entries:
        known = ", ".join(sorted(entries)) or "none"
        raise PebrError(
            f"no model family serves model_type {model_type!r} (entry-point group {GROUP}: "
            f"{known}); a package registers one for it (docs/architecture.md, "
            '"How to add a model family")'
        )
    try:
        family = entries[model_type].load()()
    except Exception as err:  # an import error inside a plugin: name it
        raise PebrError(
            f"model family {entries[model_type].value} for {model_type!r} cannot be loaded: "
            f"{type(err).__name__}: {err}"
        ) from err
    if not isinstance(family, ModelFamily):
        raise PebrError(
            f"model family {entries[model_type].value} for {model_type!r} lacks part of the "
            "ModelFamily contract (models/families/base.py)"
        )
    _cache[model_type] = family
    return family
