"""The synthetic shapes data: determinism, answers that follow from the shapes, images."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from pebr_demo.data import synth
from pebr_demo.data.synth import (
    COLOURS,
    IMAGE_SIZE,
    PALETTE,
    QUESTION_TYPES,
    SHAPE_KINDS,
    corpus_texts,
    synth_records,
    write_dataset,
)
from pebr_lightning import files

FIELD_ORDER = ["id", "image", "type", "question", "answer", "description"]
FIELD_ORDER += ["rationale", "reasoning", "keywords", "shapes"]


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return _records_only(300, seed=0)


def _records_only(n: int, seed: int) -> list[dict]:
    return [synth.make_record(i, seed) for i in range(n)]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.*"))}


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    first = write_dataset(tmp_path / "a", n=12, seed=3)
    second = write_dataset(tmp_path / "b", n=12, seed=3)
    assert first.read_bytes() == second.read_bytes()
    files_a, files_b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(files_a) == 13  # 12 images and the manifest, no temporary file left over
    assert files_a == files_b


def test_different_seed_gives_different_data(tmp_path: Path) -> None:
    write_dataset(tmp_path / "a", n=12, seed=3)
    write_dataset(tmp_path / "b", n=12, seed=4)
    files_a, files_b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert files_a["manifest.jsonl"] != files_b["manifest.jsonl"]
    assert sum(files_a[name] != files_b[name] for name in files_a) >= 10


def test_a_sample_does_not_depend_on_the_samples_before_it() -> None:
    full = list(synth_records(8, seed=5))
    tail = list(synth_records(8, seed=5, start=6))
    assert [r for r, _ in tail] == [r for r, _ in full[6:]]
    assert [img.tobytes() for _, img in tail] == [img.tobytes() for _, img in full[6:]]
    assert tail[0][0]["id"] == "shapes-5-000006"
    assert tail[0][0]["image"] == "images/000006.png"


def test_manifest_lines_keep_the_field_order(tmp_path: Path) -> None:
    manifest = write_dataset(tmp_path, n=30, seed=1)
    lines = manifest.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 30
    for line in lines:
        record = json.loads(line)
        expected = list(FIELD_ORDER)
        if record["type"] == "choice":
            expected.insert(expected.index("answer") + 1, "choices")
        assert list(record) == expected
        assert (tmp_path / record["image"]).is_file()


def test_interrupted_write_keeps_the_previous_manifest(tmp_path: Path, monkeypatch) -> None:
    manifest = write_dataset(tmp_path, n=3, seed=0)
    before = manifest.read_bytes()

    def fail(src: str, dst: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "replace", fail)  # the atomic writer synth uses
    with pytest.raises(KeyboardInterrupt):
        write_dataset(tmp_path, n=5, seed=9)
    assert manifest.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "manifest.jsonl"]


def test_every_answer_follows_from_the_shapes(records: list[dict]) -> None:
    for record in records:
        assert record["answer"] == _expected_answer(record), record


@pytest.fixture(scope="module")
def per_type() -> dict[str, list[dict]]:
    """300 records of every question type (from the first 12,000 of seed 5)."""
    found: dict[str, list[dict]] = {t: [] for t in QUESTION_TYPES}
    for record in _records_only(12_000, seed=5):
        if len(found[record["type"]]) < 300:
            found[record["type"]].append(record)
    assert all(len(v) == 300 for v in found.values()), {k: len(v) for k, v in found.items()}
    return found


@pytest.mark.parametrize("qtype", QUESTION_TYPES)
def test_300_answers_of_each_type_are_recomputed_from_the_shapes(per_type, qtype) -> None:
    for record in per_type[qtype]:
        assert record["answer"] == _expected_answer(record), record


def test_several_step_types_keep_their_steps(per_type) -> None:
    """The reasoning types are a job of their own: a corner question adds one shape's
    corners per addition, and every step's arithmetic is right."""
    for record in per_type["corners"]:
        additions = re.findall(r"(\d+) \+ (\d+) = (\d+)", " ".join(record["reasoning"]))
        listed = re.findall(r"\b(?:circle|square|triangle) (\d)\b", record["reasoning"][0])
        assert len(additions) == max(len(listed) - 1, 0)
        assert all(int(a) + int(b) == int(c) for a, b, c in additions)
        assert sum(int(v) for v in listed) == int(record["answer"])
    for record in per_type["between"]:
        (equation,) = re.findall(r"(\d+) - (\d+) - 1 = (\d+)", record["reasoning"][-1])
        high, low, answer = map(int, equation)
        assert high - low - 1 == answer == int(record["answer"])
    assert Counter(r["answer"] for r in per_type["corners"]).most_common(1)[0][1] < 100


def test_all_question_types_occur_in_the_configured_mix(records: list[dict]) -> None:
    counts = Counter(r["type"] for r in records[:200])
    assert set(counts) == set(QUESTION_TYPES)
    assert min(counts.values()) >= 5, counts  # the rarest weight is 1 of 14: about 14 in 200
    # Types drawn with weight 3 and 2 come up more often than those with 1.
    assert counts["corners"] > counts["left_of"] and counts["count"] > counts["choice"]


def test_count_colour_sometimes_asks_for_an_absent_colour(records: list[dict]) -> None:
    answers = [r["answer"] for r in records if r["type"] == "count_colour"]
    assert "0" in answers
    assert answers.count("0") < len(answers) / 2


def test_scenes_are_valid(records: list[dict]) -> None:
    counts = Counter(len(r["shapes"]) for r in records)
    assert set(counts) == {1, 2, 3, 4}
    cell = IMAGE_SIZE // 4  # one merged image token of Qwen-VL: 2x2 patches of 14 px
    for record in records:
        shapes = record["shapes"]
        xs = [s["x"] for s in shapes]
        assert xs == sorted(xs) and len(set(xs)) == len(xs)  # left to right, no ties
        columns = []
        for s in shapes:
            assert s["kind"] in SHAPE_KINDS and s["colour"] in COLOURS
            assert 18 <= s["size"] <= 26
            left, top = s["x"] - s["size"] // 2, s["y"] - s["size"] // 2
            right, bottom = left + s["size"] - 1, top + s["size"] - 1
            # wholly inside one cell, one pixel clear of its edges
            assert left // cell == right // cell and top // cell == bottom // cell, s
            assert left % cell >= 1 and right % cell <= cell - 2, s
            assert top % cell >= 1 and bottom % cell <= cell - 2, s
            columns.append(left // cell)
        assert columns == sorted(set(columns)), record["id"]  # one shape per column


def test_images_show_exactly_the_listed_colours() -> None:
    background = synth.BACKGROUND
    for record, image in synth_records(40, seed=2):
        assert image.size == (IMAGE_SIZE, IMAGE_SIZE) and image.mode == "RGB"
        pixels = Counter(image.getdata())
        palette_seen = {name for name, rgb in PALETTE.items() if rgb in pixels}
        assert palette_seen == {s["colour"] for s in record["shapes"]}
        assert set(pixels) <= {background, *PALETTE.values()}  # drawn without anti-aliasing
        assert pixels[background] > IMAGE_SIZE * IMAGE_SIZE // 2
        for s in record["shapes"]:  # the centre of every shape has the shape's colour
            assert image.getpixel((s["x"], s["y"])) == PALETTE[s["colour"]]


def test_descriptions_list_the_shapes_left_to_right_then_count_them(records: list[dict]) -> None:
    for record in records:
        shapes = record["shapes"]
        named = ", ".join(f"a {s['colour']} {s['kind']}" for s in shapes)
        if len(shapes) == 1:
            assert record["description"] == f"{named}. 1 shape."
        else:
            assert record["description"] == f"left to right: {named}. {len(shapes)} shapes."
        assert len(record["description"].split()) <= 25


def test_the_reference_response_scores_full_marks_on_the_perception_rewards(
    records: list[dict], tiny_path
) -> None:
    """A reward the data's own answer cannot satisfy is a bug: keyword, format and length
    give every reference response 1.0 (keyword in both modes)."""
    from transformers import AutoTokenizer

    from pebr_lightning.data.prompts import record_response
    from pebr_lightning.rewards.format import FormatReward
    from pebr_lightning.rewards.keyword import KeywordReward
    from pebr_lightning.rewards.length import LengthReward

    texts = [record_response(r) for r in records]
    tokenizer = AutoTokenizer.from_pretrained(tiny_path)
    for reward in (KeywordReward("paper"), KeywordReward("normalised")):
        output = reward(completions=texts, samples=records)
        assert output.scores == [1.0] * len(records), reward.mode
    assert FormatReward()(completions=texts, samples=records) == [1.0] * len(records)
    length = LengthReward()(completions=texts, samples=records, tokenizer=tokenizer)
    assert length == [1.0] * len(records)
    # ... and a description with two neighbours swapped loses a spatial keyword.
    record = next(r for r in records if len({(s["colour"], s["kind"]) for s in r["shapes"]}) > 2)
    a, b = record["shapes"][0], record["shapes"][1]
    first, second = f"a {a['colour']} {a['kind']}", f"a {b['colour']} {b['kind']}"
    swapped = texts[records.index(record)].replace(f"{first}, {second}", f"{second}, {first}", 1)
    assert swapped != texts[records.index(record)]
    (score,) = KeywordReward()(completions=[swapped], samples=[record]).scores
    assert score < 1.0


def test_keywords_rationale_and_reasoning(records: list[dict]) -> None:
    for record in records:
        shapes = record["shapes"]
        keywords = record["keywords"]
        assert list(keywords) == ["objects", "numbers", "attributes", "spatial"]
        assert set(keywords["objects"]) == {s["kind"] for s in shapes}
        assert set(keywords["attributes"]) == {s["colour"] for s in shapes}
        assert keywords["numbers"] == [str(len(shapes))]
        assert len(keywords["spatial"]) == len(shapes) - 1
        if len(shapes) > 1:
            first, second = shapes[0], shapes[1]
            expected = f"{first['colour']} {first['kind']}, a {second['colour']} {second['kind']}"
            assert keywords["spatial"][0] == expected
        assert record["rationale"].startswith("The question asks")
        assert 1 <= len(record["reasoning"]) <= 3
        assert record["reasoning"][-1].endswith(f"the answer is {record['answer']}.")


def test_corpus_texts_are_the_record_strings() -> None:
    expected = []
    for record in _records_only(25, seed=7):
        expected += [record["question"], record["answer"], *record.get("choices", [])]
        expected += [record["description"], record["rationale"], *record["reasoning"]]
        expected += [word for words in record["keywords"].values() for word in words]
    assert list(corpus_texts(25, seed=7)) == expected


def test_corpus_texts_render_no_image(monkeypatch) -> None:
    def no_drawing(shapes: list[dict]) -> None:
        raise AssertionError("corpus_texts must not render images")

    monkeypatch.setattr(synth, "draw_scene", no_drawing)
    assert len(list(corpus_texts(50, seed=0))) > 50 * 6


def _expected_answer(record: dict) -> str:
    """Work the answer out from `shapes` alone, by parsing the question."""
    question, shapes = record["question"], record["shapes"]
    if record["type"] != "choice":
        return _solve(question, shapes, record["type"])
    stem, options = question.split(" Options: ")
    choices = record["choices"]
    assert len(choices) == 4 and len(set(choices)) == 4
    assert options == " ".join(f"{letter}. {c}" for letter, c in zip("ABCD", choices, strict=True))
    return "ABCD"[choices.index(_solve(stem, shapes, None))]


def _solve(question: str, shapes: list[dict], qtype: str | None) -> str:
    def count(**match: str) -> int:
        return sum(all(s[k] == v for k, v in match.items()) for s in shapes)

    def only(colour: str, kind: str) -> int:
        found = [i for i, s in enumerate(shapes) if s["colour"] == colour and s["kind"] == kind]
        assert len(found) == 1, f"'{colour} {kind}' does not name exactly one shape"
        return found[0]

    if question == "How many shapes are there?":
        assert qtype in ("count", None)
        return str(len(shapes))
    if m := re.fullmatch(r"What colour is the (\w+)\?", question):
        assert qtype in ("colour", None)
        (shape,) = [s for s in shapes if s["kind"] == m[1]]
        return shape["colour"]
    if m := re.fullmatch(r"How many (\w+) shapes are there\?", question):
        assert qtype == "count_colour"
        return str(count(colour=m[1]))
    if m := re.fullmatch(r"Is the (\w+) (\w+) left of the (\w+) (\w+)\?", question):
        assert qtype == "left_of"
        return "yes" if shapes[only(m[1], m[2])]["x"] < shapes[only(m[3], m[4])]["x"] else "no"
    if m := re.fullmatch(r"How many (\w+)s and (\w+)s are there in total\?", question):
        assert qtype == "arithmetic" and m[1] != m[2]
        return str(count(kind=m[1]) + count(kind=m[2]))
    if m := re.fullmatch(r"How many more (\w+)s than (\w+)s are there\?", question):
        assert qtype == "arithmetic" and m[1] != m[2]
        assert count(kind=m[1]) >= count(kind=m[2])
        return str(count(kind=m[1]) - count(kind=m[2]))
    if m := re.fullmatch(r"How many corners do the (?:(\w+) )?shapes have in total\?", question):
        assert qtype == "corners"
        corners = {"circle": 0, "square": 4, "triangle": 3}  # worked out, not imported
        return str(sum(corners[s["kind"]] for s in shapes if m[1] in (None, s["colour"])))
    if m := re.fullmatch(
        r"How many shapes are between the (\w+) (\w+) and the (\w+) (\w+)\?", question
    ):
        assert qtype == "between"
        a, b = sorted((only(m[1], m[2]), only(m[3], m[4])))
        return str(sum(a < i < b for i in range(len(shapes))))
    raise AssertionError(f"unexpected question: {question!r}")
