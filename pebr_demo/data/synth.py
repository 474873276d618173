"""Deterministic synthetic "shapes" VQA data for the CPU demo and the tests.

Each sample is a 112×112 picture of 1–4 coloured shapes on a light background,
one per column of a grid of 28-px cells (one image token each),
with a question about it and the perception targets that PeBR-R1 trains on: a
short description, a one-sentence rationale, a few reasoning steps and keywords.
The description lists the shapes left to right and states their number after the
list ("left to right: a red circle, a blue square. 2 shapes."), so a model that
describes the picture first can answer every question from its own description,
and counts what it has already listed instead of committing to a number first
(docs/RESULTS.md has the measurements behind both choices).

Sample `i` of seed `s` comes from its own `random.Random(f"shapes-{s}-{i}")`, so
it is the same whichever samples were generated before it and in whichever
process (string seeds are hashed with SHA-512, not with Python's salted `hash()`).

    pebr data synth --out data/shapes --n 2000 --seed 0
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

from PIL import Image, ImageDraw

from pebr_lightning.files import write_atomic

SHAPE_KINDS = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow")
IMAGE_SIZE = 112
QUESTION_TYPES = (
    "count",
    "colour",
    "count_colour",
    "left_of",
    "arithmetic",
    "choice",
    "corners",
    "between",
)
QUESTION_WEIGHTS = (2, 2, 1, 1, 2, 1, 3, 2)
"""How often each type is drawn first (a scene that cannot support it falls back to another).
Questions a description answers directly (count, colour, choice) teach the model to
see; the several-step ones (arithmetic, corners, between) are computed from the
described shapes and give reasoning a job of its own once the picture is read right
(docs/RESULTS.md)."""
PERCEPTION_TYPES = ("count", "colour", "choice")
"""Types a right description answers in one step: the others need reasoning over it."""
CORNERS = {"circle": 0, "square": 4, "triangle": 3}
"""Corners per kind, for the corner questions: they need each shape's kind, not only the count."""

BACKGROUND = (245, 245, 240)
PALETTE = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (230, 195, 20),
}

_GRID = 4  # cells per side: 112 px / 28 px, the merged image tokens of Qwen-VL
_CELL = IMAGE_SIZE // _GRID
_MIN_SIZE, _MAX_SIZE = 18, 26  # sides in px, inside a 28-px cell with its border
_BORDER = 1  # free pixels kept between a shape and its cell's edge
_LETTERS = "ABCD"
_RARE_ABSENT_COLOUR = 0.2  # share of count_colour questions that may ask for an absent colour

# A question builder returns (question, answer, choices or None, rationale, reasoning steps),
# or None when the scene cannot support that question type.
_Question = tuple[str, str, list[str] | None, str, list[str]]


DEMO_SPLITS = {"train": 4000, "val": 200, "test": 400, "rl": 3000}
"""The demo's splits and sizes (configs/demo/schedule.yaml); split i has seed + i."""


def synth_records(n: int, seed: int, start: int = 0) -> Iterator[tuple[dict, Image.Image]]:
    """Yield `(record, image)` for samples `start .. n-1` of the dataset with this seed."""
    for index in range(start, n):
        record = make_record(index, seed)
        yield record, draw_scene(record["shapes"])


def write_dataset(out_dir: str | Path, n: int, seed: int) -> Path:
    """Write `out_dir/images/*.png` and `out_dir/manifest.jsonl`; return the manifest path.

    Images are written first and the manifest last, through a temporary file and
    `os.replace`, so an interrupted run never leaves a manifest pointing at
    missing images or a half-written manifest. The same seed gives byte-identical files.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for record, image in synth_records(n, seed):
        image.save(out_dir / record["image"], format="PNG")
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    manifest = out_dir / "manifest.jsonl"
    write_atomic(manifest, "".join(lines))
    return manifest


def written_differently(manifest: str | Path, n: int, seed: int) -> str | None:
    """Why an existing `manifest` is not what `write_dataset(..., n, seed)` writes now
    (its record count, or its first record: data of an older layout or question set),
    or None when it matches. Reads only the text, not the images."""
    lines = Path(manifest).read_text(encoding="utf-8").splitlines()
    if len(lines) != n:
        return f"holds {len(lines)} records, not {n}"
    expected = json.loads(json.dumps(make_record(0, seed), ensure_ascii=False))
    try:
        first = json.loads(lines[0])
    except json.JSONDecodeError as err:
        return f"line 1 is not JSON ({err.msg})"
    if first != expected:
        return "line 1 is not the record this version writes for it"
    return None


class ShapesData:
    """The shapes dataset as the core's synthetic-data plugin (entry-point group
    `pebr_lightning.datasets`, name `shapes`; pebr_lightning/data/synthetic.py)."""

    splits = DEMO_SPLITS

    def write(self, out_dir: str | Path, n: int, seed: int) -> Path:
        return write_dataset(out_dir, n, seed)

    def written_differently(self, manifest: str | Path, n: int, seed: int) -> str | None:
        return written_differently(manifest, n, seed)


SHAPES = ShapesData()


def corpus_texts(n: int = 2000, seed: int = 0) -> Iterator[str]:
    """Yield every text string of `n` records without rendering their images (tokenizer data)."""
    for index in range(n):
        record = make_record(index, seed)
        yield record["question"]
        yield record["answer"]
        yield from record.get("choices", [])
        yield record["description"]
        yield record["rationale"]
        yield from record["reasoning"]
        for words in record["keywords"].values():
            yield from words


def make_record(index: int, seed: int) -> dict:
    """Build the manifest record of sample `index` (its image is `draw_scene(record["shapes"])`)."""
    rng = random.Random(f"shapes-{seed}-{index}")
    shapes = _place_shapes(rng)
    qtype, (text, answer, choices, rationale, reasoning) = _pick_question(shapes, rng)
    record = {
        "id": f"shapes-{seed}-{index:06d}",
        "image": f"images/{index:06d}.png",
        "type": qtype,
        "question": text,
        "answer": answer,
    }
    if choices is not None:
        record["choices"] = choices
    record["description"] = describe(shapes)
    record["rationale"] = rationale
    record["reasoning"] = reasoning
    record["keywords"] = _keywords(shapes)
    record["shapes"] = shapes
    return record


def draw_scene(shapes: list[dict]) -> Image.Image:
    """Render shapes (centre `x`, `y` and side `size` in pixels) without anti-aliasing."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for shape in shapes:
        left, top, right, bottom = _box(shape["x"], shape["y"], shape["size"])
        fill = PALETTE[shape["colour"]]
        if shape["kind"] == "circle":
            draw.ellipse((left, top, right, bottom), fill=fill)
        elif shape["kind"] == "square":
            draw.rectangle((left, top, right, bottom), fill=fill)
        else:
            draw.polygon([(left, bottom), (right, bottom), (shape["x"], top)], fill=fill)
    return image


def describe(shapes: list[dict]) -> str:
    """'left to right: a red circle, a blue square, a green triangle. 3 shapes.'

    The list comes before the count: a left-to-right decoder then states the number
    after it has written every shape, instead of guessing it before the first one.
    """
    names = ", ".join(f"a {_name(s)}" for s in shapes)
    if len(shapes) == 1:
        return f"{names}. 1 shape."
    return f"left to right: {names}. {len(shapes)} shapes."


def _pick_question(shapes: list[dict], rng: random.Random) -> tuple[str, _Question]:
    """Draw a question type; if the scene cannot support it, try the others in random order."""
    (first,) = rng.choices(QUESTION_TYPES, weights=QUESTION_WEIGHTS)
    others = [t for t in QUESTION_TYPES if t != first]
    rng.shuffle(others)
    for qtype in (first, *others):
        question = _QUESTION_BUILDERS[qtype](shapes, rng)
        if question is not None:
            return qtype, question
    raise AssertionError("unreachable: a count question fits every scene")


def _place_shapes(rng: random.Random) -> list[dict]:
    """1–4 shapes, one per column of a 4×4 grid of 28-px cells, each inside its cell.

    The cells are the image tokens' own: Qwen-VL merges 2×2 patches of 14 px, so a
    112-px picture becomes 4×4 tokens of 28×28 px. A shape that lies inside one token
    is seen whole by it, and left to right is the token's column. Placed anywhere, a
    shape straddled up to four tokens and the tiny model rarely told its kind
    (docs/RESULTS.md). Distinct columns keep "left to right" unambiguous.
    """
    columns = sorted(rng.sample(range(_GRID), rng.randint(1, _GRID)))
    shapes = []
    for column in columns:
        row = rng.randrange(_GRID)
        size = rng.randint(_MIN_SIZE, _MAX_SIZE)
        left = column * _CELL + rng.randint(_BORDER, _CELL - _BORDER - size)
        top = row * _CELL + rng.randint(_BORDER, _CELL - _BORDER - size)
        kind, colour = rng.choice(SHAPE_KINDS), rng.choice(COLOURS)
        shapes.append(
            {
                "kind": kind,
                "colour": colour,
                "x": left + size // 2,
                "y": top + size // 2,
                "size": size,
            }
        )
    return shapes


def _box(x: int, y: int, size: int) -> tuple[int, int, int, int]:
    left, top = x - size // 2, y - size // 2
    return left, top, left + size - 1, top + size - 1


def _name(shape: dict) -> str:
    return f"{shape['colour']} {shape['kind']}"


def _count_phrase(count: int, kind: str) -> str:
    return f"There is 1 {kind}." if count == 1 else f"There are {count} {kind}s."


def _keywords(shapes: list[dict]) -> dict[str, list[str]]:
    kinds = {s["kind"] for s in shapes}
    colours = {s["colour"] for s in shapes}
    return {
        "objects": [k for k in SHAPE_KINDS if k in kinds],
        "numbers": [str(len(shapes))],
        "attributes": [c for c in COLOURS if c in colours],
        # Neighbours in the description's own words ("red circle, a blue square"), so
        # the reference response finds every keyword and a wrong order finds fewer.
        "spatial": [f"{_name(a)}, a {_name(b)}" for a, b in pairwise(shapes)],
    }


def _count(shapes: list[dict], rng: random.Random) -> _Question:
    n = str(len(shapes))
    return (
        "How many shapes are there?",
        n,
        None,
        "The question asks for the number of shapes.",
        [
            f"The description lists {n} {'shape' if n == '1' else 'shapes'}.",
            f"So the answer is {n}.",
        ],
    )


def _colour(shapes: list[dict], rng: random.Random) -> _Question | None:
    kind_counts = Counter(s["kind"] for s in shapes)
    unique = [s for s in shapes if kind_counts[s["kind"]] == 1]
    if not unique:
        return None
    shape = rng.choice(unique)
    return (
        f"What colour is the {shape['kind']}?",
        shape["colour"],
        None,
        f"The question asks for the colour of the {shape['kind']}.",
        [f"The only {shape['kind']} is {shape['colour']}.", f"So the answer is {shape['colour']}."],
    )


def _count_colour(shapes: list[dict], rng: random.Random) -> _Question:
    if rng.random() < _RARE_ABSENT_COLOUR:
        colour = rng.choice(COLOURS)
    else:
        colour = rng.choice([s["colour"] for s in shapes])
    matching = [f"a {_name(s)}" for s in shapes if s["colour"] == colour]
    if not matching:
        step = f"No shape is {colour}."
    elif len(matching) == 1:
        step = f"The only {colour} shape is {matching[0]}."
    else:
        step = f"The {colour} shapes are: {', '.join(matching)}."
    return (
        f"How many {colour} shapes are there?",
        str(len(matching)),
        None,
        f"The question asks how many shapes are {colour}.",
        [step, f"So the answer is {len(matching)}."],
    )


def _two_named(shapes: list[dict], rng: random.Random) -> tuple[int, int] | None:
    """Positions of two shapes whose names ("red circle") occur once, drawn at random;
    None when fewer than two names are unique."""
    name_counts = Counter(_name(s) for s in shapes)
    unique = [i for i, s in enumerate(shapes) if name_counts[_name(s)] == 1]
    if len(unique) < 2:
        return None
    i, j = rng.sample(unique, 2)
    return i, j


def _left_of(shapes: list[dict], rng: random.Random) -> _Question | None:
    pair = _two_named(shapes, rng)
    if pair is None:
        return None
    i, j = pair
    a, b = _name(shapes[i]), _name(shapes[j])
    answer = "yes" if i < j else "no"
    relation = "comes before" if i < j else "comes after"
    return (
        f"Is the {a} left of the {b}?",
        answer,
        None,
        f"The question asks whether the {a} is left of the {b}.",
        [
            f"The {a} is shape {i + 1} from the left.",
            f"The {b} is shape {j + 1} from the left.",
            f"{i + 1} {relation} {j + 1}, so the answer is {answer}.",
        ],
    )


def _arithmetic(shapes: list[dict], rng: random.Random) -> _Question:
    counts = Counter(s["kind"] for s in shapes)
    first = rng.choice(sorted(counts))  # at least one of the two kinds is in the picture
    second = rng.choice([k for k in SHAPE_KINDS if k != first])
    steps = [_count_phrase(counts[first], first), _count_phrase(counts[second], second)]
    if rng.random() < 0.5:
        total = counts[first] + counts[second]
        return (
            f"How many {first}s and {second}s are there in total?",
            str(total),
            None,
            f"The question asks for the total number of {first}s and {second}s.",
            [*steps, f"{counts[first]} + {counts[second]} = {total}, so the answer is {total}."],
        )
    if counts[first] < counts[second]:
        first, second = second, first
        steps.reverse()
    more = counts[first] - counts[second]
    return (
        f"How many more {first}s than {second}s are there?",
        str(more),
        None,
        f"The question asks how many more {first}s there are than {second}s.",
        [*steps, f"{counts[first]} - {counts[second]} = {more}, so the answer is {more}."],
    )


def _choice(shapes: list[dict], rng: random.Random) -> _Question:
    colour_question = _colour(shapes, rng) if rng.random() < 0.5 else None
    if colour_question is not None:
        stem, value, _, rationale, steps = colour_question
        options = list(COLOURS)
        rng.shuffle(options)
    else:
        stem, value, _, rationale, steps = _count(shapes, rng)
        distractors = rng.sample([str(v) for v in range(1, 8) if str(v) != value], 3)
        options = sorted([value, *distractors], key=int)
    letter = _LETTERS[options.index(value)]
    listed = " ".join(f"{_LETTERS[i]}. {option}" for i, option in enumerate(options))
    return (
        f"{stem} Options: {listed}",
        letter,
        options,
        f"{rationale[:-1]} and the option that matches it.",
        [steps[0], f"Option {letter} is {value}, so the answer is {letter}."],
    )


def _corners(shapes: list[dict], rng: random.Random) -> _Question:
    """Total corners of all shapes, or of the shapes of one colour: a running sum over
    the described kinds, one addition per step."""
    colour = rng.choice([s["colour"] for s in shapes]) if rng.random() < 0.4 else None
    chosen = shapes if colour is None else [s for s in shapes if s["colour"] == colour]
    values = [CORNERS[s["kind"]] for s in chosen]
    total = sum(values)
    which = "the shapes" if colour is None else f"the {colour} shapes"
    listed = ", ".join(f"{s['kind']} {CORNERS[s['kind']]}" for s in chosen)
    steps = [f"Corners of {which}: {listed}."]
    running, sums = values[0], []
    for value in values[1:]:
        sums.append(f"{running} + {value} = {running + value}")
        running += value
    if sums:
        steps.append(", ".join(sums) + ".")
    steps.append(f"So the answer is {total}.")
    return (
        f"How many corners do {which} have in total?",
        str(total),
        None,
        f"The question asks for the total number of corners of {which}.",
        steps,
    )


def _between(shapes: list[dict], rng: random.Random) -> _Question | None:
    """Shapes strictly between two named ones: both positions, then a difference."""
    pair = _two_named(shapes, rng)
    if pair is None:
        return None
    i, j = pair
    a, b = _name(shapes[i]), _name(shapes[j])
    low, high = sorted((i + 1, j + 1))
    answer = high - low - 1
    return (
        f"How many shapes are between the {a} and the {b}?",
        str(answer),
        None,
        f"The question asks how many shapes lie between the {a} and the {b}.",
        [
            f"The {a} is shape {i + 1} from the left.",
            f"The {b} is shape {j + 1} from the left.",
            f"{high} - {low} - 1 = {answer}, so the answer is {answer}.",
        ],
    )


_QUESTION_BUILDERS = {
    "count": _count,
    "colour": _colour,
    "count_colour": _count_colour,
    "left_of": _left_of,
    "arithmetic": _arithmetic,
    "choice": _choice,
    "corners": _corners,
    "between": _between,
}
