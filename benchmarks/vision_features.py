"""Does a model's vision tower tell colours apart, or only kinds? A probe of the token
features the language model reads.

For each model folder: one shape of each kind (3) and colour (4) drawn alone in the
same cell of the synthetic layout; the merged vision token of that cell is taken from
`model.visual`. It prints a table: the mean feature norm, the mean distance between
two colours of the same kind, the mean distance between two kinds of the same colour,
and their ratio. Written to find out why warm-up SFT sometimes never learns colours
(docs/RESULTS.md): in those runs kinds were read and colours named at chance.

    python benchmarks/vision_features.py tiny-qwen2.5-vl runs/.../sft/.../last.hf ...
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

from pebr_demo.data.synth import COLOURS, SHAPE_KINDS, draw_scene
from pebr_demo.models.tiny import ensure_tiny_model, is_tiny_name

CELL_X, CELL_Y = 42, 42
"""The centre of the cell at row 1, column 1 (28-px cells): merged token 1 * 4 + 1."""
TOKEN = 5


def cell_features(folder: str | Path) -> dict[tuple[str, str], torch.Tensor]:
    """(kind, colour) -> the vision token [hidden] of a lone shape in one cell."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    out = {}
    for kind, colour in itertools.product(SHAPE_KINDS, COLOURS):
        shape = {"kind": kind, "colour": colour, "x": CELL_X, "y": CELL_Y, "size": 22}
        batch = processor.image_processor(images=[draw_scene([shape])], return_tensors="pt")
        with torch.no_grad():
            tokens = model.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
        tokens = getattr(tokens, "pooler_output", tokens)  # [16, hidden] merged tokens
        out[(kind, colour)] = tokens[TOKEN]
    return out


def separation(features: dict[tuple[str, str], torch.Tensor]) -> dict[str, float]:
    """Mean norm, mean colour distance (same kind), mean kind distance (same colour)."""

    def mean_distance(pairs: list[tuple[tuple[str, str], tuple[str, str]]]) -> float:
        return sum(float((features[a] - features[b]).norm()) for a, b in pairs) / len(pairs)

    colour = [((k, a), (k, b)) for k in SHAPE_KINDS for a, b in itertools.combinations(COLOURS, 2)]
    kind = [((a, c), (b, c)) for c in COLOURS for a, b in itertools.combinations(SHAPE_KINDS, 2)]
    norms = torch.stack(list(features.values())).norm(dim=-1)
    return {
        "norm": float(norms.mean()),
        "colour": mean_distance(colour),
        "kind": mean_distance(kind),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="model folders (.hf) or tiny-qwen2.5-vl")
    args = parser.parse_args(argv)
    print("| model | feature norm | colour distance | kind distance | colour / kind |")
    print("|---|---|---|---|---|")
    for name in args.models:
        folder = ensure_tiny_model(name) if is_tiny_name(name) else Path(name)
        s = separation(cell_features(folder))
        print(
            f"| {name} | {s['norm']:.3f} | {s['colour']:.3f} | {s['kind']:.3f}"
            f" | {s['colour'] / s['kind']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
