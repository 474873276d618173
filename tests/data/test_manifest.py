"""Manifest validation: every bad input names the file, the line and the field."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from pebr_lightning.data.images import load_image
from pebr_lightning.data.manifest import Problem, load_manifest
from pebr_lightning.errors import ManifestError, PebrError


@pytest.fixture(autouse=True)
def strict_image_loading(monkeypatch) -> None:
    """Another library may have switched on lenient loading; these tests need the default."""
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)


def _error(path: Path, **kwargs) -> str:
    with pytest.raises(ManifestError) as info:
        load_manifest(path, **kwargs)
    return str(info.value)


def test_valid_manifest_resolves_images_and_keeps_other_fields(
    write_lines, dataset, tmp_path: Path
) -> None:
    manifest, records = dataset
    records[0]["reward_extra"] = {"boxes": [[1, 2, 3, 4]], "note": None}
    records[1]["image"] = str(tmp_path / records[1]["image"])  # absolute stays as it is
    write_lines(manifest, [records[0], "", records[1], "   ", records[2], records[3]])

    loaded = load_manifest(manifest)

    assert loaded.path == manifest and loaded.problems == []
    assert len(loaded.records) == 4  # blank lines are ignored
    for original, record in zip(records, loaded.records, strict=True):
        name = Path(original["image"]).name
        assert record["image"] == str(tmp_path / "images" / name)
        assert os.path.isabs(record["image"])
        assert {k: v for k, v in record.items() if k != "image"} == {
            k: v for k, v in original.items() if k != "image"
        }
    assert loaded.records[0]["reward_extra"] == {"boxes": [[1, 2, 3, 4]], "note": None}


def test_relative_images_resolve_against_the_manifest_folder(
    write_lines, dataset, tmp_path: Path
) -> None:
    _, records = dataset
    (tmp_path / "lists").mkdir()
    records[0]["image"] = "../" + records[0]["image"]
    other = write_lines(tmp_path / "lists" / "one.jsonl", [records[0]])
    loaded = load_manifest(os.path.relpath(other))
    assert loaded.records[0]["image"] == str(tmp_path / "images" / "000000.png")


def test_minimal_record_is_valid(write_lines, dataset, tmp_path: Path) -> None:
    minimal = {"id": "a", "image": "images/000000.png", "question": "?", "answer": ""}
    loaded = load_manifest(write_lines(tmp_path / "min.jsonl", [minimal]))
    assert loaded.records[0]["answer"] == "" and len(loaded.records[0]) == 4


def test_missing_image_file(dataset, tmp_path: Path) -> None:
    manifest, _ = dataset
    (tmp_path / "images" / "000001.png").unlink()
    message = _error(manifest)
    assert "manifest.jsonl:2: field 'image': image file not found" in message
    assert "000001.png" in message and "(id shapes-0-000001)" in message


def test_unreadable_image(dataset, tmp_path: Path) -> None:
    manifest, _ = dataset
    (tmp_path / "images" / "000002.png").write_bytes(random.Random(0).randbytes(300))
    message = _error(manifest)
    assert "manifest.jsonl:3: field 'image': image unreadable" in message


def test_truncated_image(dataset, tmp_path: Path) -> None:
    manifest, _ = dataset
    image = tmp_path / "images" / "000003.png"
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    message = _error(manifest)
    assert "manifest.jsonl:4: field 'image': image unreadable or truncated" in message
    assert "000003.png" in message


def test_images_are_not_opened_when_checks_are_off(dataset, tmp_path: Path) -> None:
    manifest, _ = dataset
    (tmp_path / "images" / "000001.png").unlink()
    loaded = load_manifest(manifest, check_images=False)
    assert len(loaded.records) == 4


def test_malformed_json_line(write_lines, dataset) -> None:
    manifest, records = dataset
    write_lines(manifest, [records[0], '{"id": "b", "image": ', records[2]])
    message = _error(manifest)
    assert "manifest.jsonl:2: malformed JSON" in message
    assert "Expecting value" in message  # the JSON error itself


def test_line_that_is_not_an_object(write_lines, dataset) -> None:
    manifest, records = dataset
    write_lines(manifest, [records[0], records[1], '["id", "image"]'])
    assert "manifest.jsonl:3: expected a JSON object, got list" in _error(manifest)


@pytest.mark.parametrize("field", ["id", "image", "question", "answer"])
def test_missing_required_field(write_lines, dataset, field: str) -> None:
    manifest, records = dataset
    del records[1][field]
    write_lines(manifest, records)
    message = _error(manifest)
    assert f"manifest.jsonl:2: field '{field}': required field is missing" in message


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("answer", 3, "expected a string, got int"),
        ("question", None, "expected a string, got null"),
        ("id", "", "expected a non-empty string, got an empty string"),
        ("image", ["a.png"], "expected a non-empty string (path to an image file), got list"),
        ("keywords", ["red", "circle"], "expected an object mapping names to lists of strings"),
        ("keywords", {"objects": "circle"}, "expected an object mapping names to lists of"),
        ("choices", "A B C", "expected a list of strings, got str"),
        ("choices", [1, 2], "expected a list of strings, got list"),
        ("reasoning", {"step": "x"}, "expected a string or a list of strings, got object"),
        ("description", True, "expected a string, got bool"),
        ("rationale", 1.5, "expected a string, got float"),
        ("type", 1, "expected a string, got int"),
    ],
)
def test_mistyped_field(write_lines, dataset, field: str, value: object, expected: str) -> None:
    manifest, records = dataset
    records[2][field] = value
    write_lines(manifest, records)
    message = _error(manifest)
    assert f"manifest.jsonl:3: field '{field}': {expected}" in message
    assert "1 problem(s) on 1 line(s)" in message


def test_reasoning_may_be_a_single_string(write_lines, dataset) -> None:
    manifest, records = dataset
    records[0]["reasoning"] = "One step, so the answer is 3."
    write_lines(manifest, records)
    assert load_manifest(manifest).records[0]["reasoning"] == "One step, so the answer is 3."


def test_duplicate_id(write_lines, dataset) -> None:
    manifest, records = dataset
    records[3]["id"] = records[1]["id"]
    write_lines(manifest, records)
    message = _error(manifest)
    assert "manifest.jsonl:4: field 'id': duplicate id, first used on line 2" in message


def test_empty_manifest(tmp_path: Path) -> None:
    manifest = tmp_path / "empty.jsonl"
    manifest.write_text("\n  \n", encoding="utf-8")
    assert _error(manifest) == f"manifest {manifest} is empty: it has no records"


def test_missing_manifest_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(PebrError) as info:
        load_manifest(missing)
    assert isinstance(info.value, ManifestError) and info.value.exit_code == 2
    assert str(info.value) == f"manifest not found: {missing}"


def test_long_problem_lists_are_cut_at_20(write_lines, dataset) -> None:
    manifest, records = dataset
    write_lines(manifest, [records[0]] + ["not json"] * 25)
    lines = _error(manifest).splitlines()
    assert "25 problem(s) on 25 line(s)" in lines[0]
    listed = [line for line in lines if "malformed JSON" in line]
    assert len(listed) == 20 and "manifest.jsonl:21:" in listed[-1]
    assert "  ... and 5 more" in lines
    assert "skip_invalid" in lines[-1]


def test_the_hints_name_the_config_keys_pebr_fit_reads(write_lines, dataset) -> None:
    """The data module sits under `class_path`/`init_args` in every config, so that is
    the key to write (`data.skip_invalid` is not one in the YAML files)."""
    from pebr_lightning.data.datamodule import ManifestDataModule

    manifest, records = dataset
    write_lines(manifest, [records[0], "not json"])
    hint = _error(manifest).splitlines()[-1]
    assert "`data.init_args.skip_invalid: true` (training)" in hint
    with pytest.raises(PebrError, match=r"^`pebr fit` needs data.init_args.train_manifest$"):
        ManifestDataModule().setup("fit")


def test_skip_invalid_returns_the_valid_records_and_the_problems(
    write_lines, dataset, tmp_path: Path
) -> None:
    manifest, records = dataset
    records[1]["answer"] = 2
    records[1]["keywords"] = []
    write_lines(manifest, [records[0], records[1], "{oops", records[2], records[3]])
    (tmp_path / "images" / "000003.png").unlink()

    loaded = load_manifest(manifest, skip_invalid=True)

    assert [r["id"] for r in loaded.records] == ["shapes-0-000000", "shapes-0-000002"]
    assert [(p.line, p.field) for p in loaded.problems] == [
        (2, "answer"),
        (2, "keywords"),
        (3, None),
        (5, "image"),
    ]
    assert loaded.skipped_lines == 3
    assert loaded.problems[0].sample_id == "shapes-0-000001"
    assert str(loaded.problems[0]).startswith(f"{manifest}:2: field 'answer': expected a string")


def test_skip_invalid_with_nothing_left_still_fails(write_lines, dataset) -> None:
    manifest, _ = dataset
    write_lines(manifest, ["[]", "{"])
    message = _error(manifest, skip_invalid=True)
    assert f"{manifest} has no valid records" in message
    assert "manifest.jsonl:2: malformed JSON" in message


def test_problem_str() -> None:
    assert str(Problem("m.jsonl", 3, "image", "gone", "s1")) == (
        "m.jsonl:3: field 'image': gone (id s1)"
    )
    assert str(Problem("m.jsonl", 7, None, "malformed JSON", None)) == "m.jsonl:7: malformed JSON"


def test_load_image_returns_rgb(tmp_path: Path) -> None:
    path = tmp_path / "grey.png"
    Image.new("L", (5, 3), 128).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (5, 3)
    assert image.getpixel((0, 0)) == (128, 128, 128)


@pytest.mark.parametrize("content", [None, b"\x89PNG\r\n\x1a\n garbage"])
def test_load_image_names_an_unreadable_file(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "bad.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ManifestError, match=r"cannot read image .*bad\.png"):
        load_image(path)


def test_ten_thousand_records_load(write_lines, tmp_path: Path) -> None:
    Image.new("RGB", (4, 4)).save(tmp_path / "x.png")
    lines = [
        {"id": str(i), "image": "x.png", "question": "q", "answer": "a"} for i in range(10_000)
    ]
    manifest = write_lines(tmp_path / "big.jsonl", lines)
    loaded = load_manifest(manifest)
    assert len(loaded.records) == 10_000


# -- images as a person sees them: transparency over white, 16-bit scaled ---------------


def test_a_transparent_diagram_loads_on_white_not_black(tmp_path: Path) -> None:
    """A diagram drawn on a transparent background (alpha 0, hidden colour black): a
    plain convert("RGB") made 98 % of it black."""
    image = Image.new("RGBA", (50, 50), (0, 0, 0, 0))
    for x in range(20, 27):
        for y in range(20, 27):
            image.putpixel((x, y), (200, 30, 30, 255))
    image.putpixel((0, 0), (0, 0, 255, 128))  # half-transparent blue over white
    image.save(tmp_path / "diagram.png")
    rgb = load_image(tmp_path / "diagram.png")
    assert rgb.mode == "RGB"
    colours = rgb.getcolors()
    assert dict((c, n) for n, c in colours)[(255, 255, 255)] == 50 * 50 - 49 - 1
    assert rgb.getpixel((22, 22)) == (200, 30, 30)
    assert rgb.getpixel((0, 0)) == (127, 127, 255)  # 0.5 blue + 0.5 white, rounded


def test_a_palette_image_with_a_transparent_index_loads_on_white(tmp_path: Path) -> None:
    image = Image.new("P", (10, 10), 0)
    image.putpalette([0, 0, 0, 0, 128, 0] + [0] * 762)  # index 0 black, index 1 green
    image.putpixel((5, 5), 1)
    image.save(tmp_path / "palette.png", transparency=0)
    rgb = load_image(tmp_path / "palette.png")
    assert rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((5, 5)) == (0, 128, 0)


def test_a_16_bit_png_is_scaled_not_clipped_to_white(tmp_path: Path) -> None:
    """16-bit grayscale 0..65535: a plain convert("RGB") clipped 99.6 % of it to 255."""
    import numpy as np

    ramp = (np.arange(256, dtype=np.uint32) * 257).astype(np.uint16)  # 0, 257, ..., 65535
    pixels = np.tile(ramp, (4, 1))
    Image.fromarray(pixels).save(tmp_path / "ramp16.png")
    with Image.open(tmp_path / "ramp16.png") as raw:
        assert raw.mode.startswith("I")  # really a wide-mode image as PIL reads it
    rgb = np.asarray(load_image(tmp_path / "ramp16.png"))
    assert rgb.shape == (4, 256, 3)
    assert (rgb[0, :, 0] == np.arange(256)).all()  # v * 257 -> v
    assert (rgb[..., 0] == rgb[..., 2]).all()


def test_an_ordinary_rgb_image_is_unchanged(tmp_path: Path) -> None:
    image = Image.new("RGB", (8, 8), (10, 20, 30))
    image.putpixel((3, 3), (250, 0, 5))
    image.save(tmp_path / "plain.png")
    assert list(load_image(tmp_path / "plain.png").getdata()) == list(image.getdata())


def test_an_oversized_image_is_refused_from_its_header_or_shrunk(tmp_path, monkeypatch) -> None:
    """A 10000 x 10000 PNG decoded at up to 0.9 GB per load; the size is now checked
    from the header first (here with a 10,000-pixel limit and a 200 x 100 image)."""
    Image.new("RGB", (200, 100), (0, 128, 255)).save(tmp_path / "big.png")
    monkeypatch.setenv("PEBR_MAX_IMAGE_PIXELS", "10000")
    with pytest.raises(ManifestError) as info:
        load_image(tmp_path / "big.png")
    message = str(info.value)
    assert message.startswith(f"image {tmp_path / 'big.png'} is 200 x 100 = 20,000 pixels")
    assert "over the limit of 10,000" in message
    assert "PEBR_RESIZE_LARGE_IMAGES=1" in message
    monkeypatch.setenv("PEBR_RESIZE_LARGE_IMAGES", "1")
    small = load_image(tmp_path / "big.png")
    assert small.size == (140, 70) and small.getpixel((5, 5)) == (0, 128, 255)  # aspect 2:1


def test_validation_reports_an_oversized_image_without_decoding_it(tmp_path, monkeypatch) -> None:
    import json

    Image.new("RGB", (200, 100)).save(tmp_path / "big.png")
    record = {"id": "a", "image": "big.png", "question": "q", "answer": "1"}
    (tmp_path / "m.jsonl").write_text(json.dumps(record) + "\n")
    monkeypatch.setenv("PEBR_MAX_IMAGE_PIXELS", "10000")
    with pytest.raises(ManifestError, match=r"m\.jsonl:1: field 'image': .* = 20,000 pixels"):
        load_manifest(tmp_path / "m.jsonl")
