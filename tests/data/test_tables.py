"""Parquet files and saved Hugging Face dataset folders as manifests.

The tables are written here in the layouts the public datasets use (an HF `Image`
struct of PNG bytes; Parquet written by pyarrow; folders written by `datasets` itself)
and read through `datasets` (data/tables.py). Hub ids: test_hub_sources.py.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets.table import InMemoryTable
from PIL import Image

from pebr_lightning.data.commands import main
from pebr_lightning.data.datamodule import ManifestDataModule
from pebr_lightning.data.images import load_image
from pebr_lightning.data.manifest import load_manifest
from pebr_lightning.data.tables import read_table_rows
from pebr_lightning.errors import ManifestError

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
FIELD_MAP = {"question": "problem", "image": "images"}


@pytest.fixture(autouse=True)
def image_cache(tmp_path: Path, monkeypatch) -> Path:
    """Images extracted with the default folder land in the test's own cache."""
    monkeypatch.setenv("PEBR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "images"


def _png(colour: tuple[int, int, int], size: tuple[int, int] = (6, 4)) -> bytes:
    image = Image.new("RGB", size, colour)
    image.putpixel((0, 0), (255 - colour[0], 0, 7))  # not a flat image: pixels must survive
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _pixels(image: Image.Image) -> list:
    return list(image.convert("RGB").getdata())


COLOURS = [(200, 10, 10), (10, 200, 10), (10, 10, 200)]


def _geometry_table(images: pa.Array | None = None) -> pa.Table:
    """Three rows as a public dataset ships them: its own column names, numeric answers."""
    pngs = [_png(c) for c in COLOURS]
    if images is None:
        images = pa.array([{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(pngs)], IMAGE)
    return pa.table(
        {
            "id": ["g-0", "g-1", "g-2"],
            "images": images,
            "problem": ["How many sides?", "What is x?", "Find the angle."],
            "answer": pa.array([3, 12, 45], pa.int64()),
            "source": ["geo3k", "geo3k", "mathverse"],
            "thumbnail": pa.array([b"\x00\x01", b"\x02", None], pa.binary()),
        }
    )


def _dataset(table: pa.Table) -> datasets.Dataset:
    """`table` as a `datasets.Dataset`, its image struct column typed as an HF Image."""
    dataset = datasets.Dataset(InMemoryTable(table))
    if table.schema.field("images").type == IMAGE:
        dataset = dataset.cast_column("images", datasets.Image())
    return dataset


def _save_to_disk(table: pa.Table, folder: Path, shards: int = 1) -> Path:
    """Write `table` with `datasets.Dataset.save_to_disk`, in `shards` Arrow files."""
    _dataset(table).save_to_disk(str(folder), num_shards=shards)
    return folder


def test_saved_dataset_folder_gives_the_same_records(tmp_path: Path) -> None:
    table = _geometry_table()
    parquet = tmp_path / "train.parquet"
    pq.write_table(table, parquet)
    folder = _save_to_disk(table, tmp_path / "saved", shards=2)
    image_dir = tmp_path / "extracted"

    from_folder = load_manifest(folder, field_map=FIELD_MAP, image_dir=image_dir)
    from_parquet = load_manifest(parquet, field_map=FIELD_MAP, image_dir=image_dir)

    assert from_folder.records == from_parquet.records
    assert [r["id"] for r in from_folder.records] == ["g-0", "g-1", "g-2"]  # shard order
    assert [r["answer"] for r in from_folder.records] == ["3", "12", "45"]
    assert len(read_table_rows(folder)) == 3


def test_saved_dataset_without_state_json_reads_data_files_in_order(tmp_path: Path) -> None:
    folder = _save_to_disk(_geometry_table(), tmp_path / "saved", shards=3)
    (folder / "state.json").unlink()
    rows = read_table_rows(folder)
    assert [row["id"] for row in rows] == ["g-0", "g-1", "g-2"]
    assert rows[0]["images"]["path"] == "0.png" and rows[0]["answer"] == 3


def test_saved_dataset_dict_folder_names_a_split(tmp_path: Path) -> None:
    table = _geometry_table()
    both = datasets.DatasetDict(
        {"train": _dataset(table.slice(0, 2)), "test": _dataset(table.slice(2, 1))}
    )
    both.save_to_disk(str(tmp_path / "dd"))
    test = load_manifest(f"{tmp_path / 'dd'}@test", field_map=FIELD_MAP)
    assert [r["id"] for r in test.records] == ["g-2"]
    # Unnamed: the train split, as `datasets` users expect.
    assert [r["id"] for r in load_manifest(tmp_path / "dd", field_map=FIELD_MAP).records] == [
        "g-0",
        "g-1",
    ]
    with pytest.raises(ManifestError) as info:
        load_manifest(f"{tmp_path / 'dd'}@validation", field_map=FIELD_MAP)
    assert str(info.value) == (
        f"{tmp_path / 'dd'}@validation: no split 'validation'; its splits are: train, test"
    )


def test_a_list_of_one_image_is_that_image(tmp_path: Path) -> None:
    pngs = [_png(c) for c in COLOURS]
    images = pa.array([[{"bytes": b, "path": None}] for b in pngs], pa.list_(IMAGE))
    path = tmp_path / "list.parquet"
    pq.write_table(_geometry_table(images), path)
    loaded = load_manifest(path, field_map=FIELD_MAP, image_dir=tmp_path / "img")
    assert [_pixels(load_image(r["image"])) for r in loaded.records] == [
        _pixels(Image.open(io.BytesIO(b))) for b in pngs
    ]


def test_a_list_of_two_images_is_a_record_of_two_images(tmp_path: Path) -> None:
    pngs = [_png(c) for c in COLOURS]
    cells = [{"bytes": b, "path": None} for b in pngs]
    images = pa.array([[cells[0]], [cells[1], cells[2]], [cells[2]]], pa.list_(IMAGE))
    path = tmp_path / "two.parquet"
    pq.write_table(_geometry_table(images), path)
    records = load_manifest(path, field_map=FIELD_MAP, image_dir=tmp_path / "img").records
    assert "images" not in records[0] and "image" not in records[1]
    assert [_pixels(load_image(p)) for p in records[1]["images"]] == [
        _pixels(Image.open(io.BytesIO(b))) for b in pngs[1:]
    ]
    # Read as `images` without a field_map too: the usual name of such a column.
    table = _geometry_table(images).rename_columns(
        ["id", "images", "question", "answer", "source", "thumbnail"]
    )
    pq.write_table(table, tmp_path / "native.parquet")
    native = load_manifest(tmp_path / "native.parquet", image_dir=tmp_path / "img").records
    assert [r["images"] for r in native] == [
        [records[0]["image"]],
        *[r["images"] for r in records[1:2]],
        [records[2]["image"]],
    ]


def test_bytes_that_are_not_an_image_in_an_images_list_name_the_row(tmp_path: Path) -> None:
    one = {"bytes": _png(COLOURS[0]), "path": None}
    images = pa.array([[one], [one, {"bytes": b"not a png", "path": None}], [one]], pa.list_(IMAGE))
    path = tmp_path / "bad.parquet"
    pq.write_table(_geometry_table(images), path)
    loaded = load_manifest(path, field_map=FIELD_MAP, image_dir=tmp_path / "img", skip_invalid=True)
    assert [r["id"] for r in loaded.records] == ["g-0", "g-2"]
    assert [(p.line, p.field, p.unit) for p in loaded.problems] == [(2, "images", "row")]
    assert "the image bytes are not an image PIL can read" in str(loaded.problems[0])


def test_plain_bytes_and_relative_paths_are_images_too(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    Image.open(io.BytesIO(_png(COLOURS[2]))).save(tmp_path / "sub" / "on-disk.png")
    bytes_table = tmp_path / "bytes.parquet"
    pq.write_table(
        pa.table({"id": ["b"], "image": [_png(COLOURS[0])], "question": ["q"], "answer": ["a"]}),
        bytes_table,
    )
    path_table = tmp_path / "sub" / "paths.parquet"
    pq.write_table(
        pa.table({"id": ["p"], "image": ["on-disk.png"], "q": ["q"], "a": ["a"]}), path_table
    )

    from_bytes = load_manifest(bytes_table, image_dir=tmp_path / "img").records[0]
    from_path = load_manifest(
        path_table, field_map={"question": "q", "answer": "a"}, image_dir=tmp_path / "img"
    ).records[0]

    expected = _pixels(Image.open(io.BytesIO(_png(COLOURS[0]))))
    assert _pixels(load_image(from_bytes["image"])) == expected
    image = str(tmp_path / "sub" / "on-disk.png")  # resolved against the table's folder
    assert from_path == {"id": "p", "image": image, "question": "q", "answer": "a"}


def test_a_row_without_an_answer_names_file_row_and_field(tmp_path: Path) -> None:
    table = _geometry_table().set_column(3, "answer", pa.array([3, None, 45], pa.int64()))
    path = tmp_path / "holes.parquet"
    pq.write_table(table, path)

    with pytest.raises(ManifestError) as info:
        load_manifest(path, field_map=FIELD_MAP, image_dir=tmp_path / "img")
    message = str(info.value)
    assert f"{path}:row 2: field 'answer': required field is missing (id g-1)" in message
    assert "Fix these rows" in message

    loaded = load_manifest(path, field_map=FIELD_MAP, image_dir=tmp_path / "img", skip_invalid=True)
    assert [(r["id"], r["answer"]) for r in loaded.records] == [("g-0", "3"), ("g-2", "45")]
    assert loaded.skipped_lines == 1
    assert str(loaded.problems[0]) == (
        f"{path}:row 2: field 'answer': required field is missing (id g-1)"
    )


def test_float_answers_become_text_and_other_fields_keep_their_types(tmp_path: Path) -> None:
    table = _geometry_table().set_column(3, "answer", pa.array([3.0, 2.5, float("nan")]))
    path = tmp_path / "floats.parquet"
    pq.write_table(table, path)
    loaded = load_manifest(path, field_map=FIELD_MAP, image_dir=tmp_path / "img", skip_invalid=True)
    assert [r["answer"] for r in loaded.records] == ["3", "2.5"]
    assert [str(p) for p in loaded.problems] == [
        f"{path}:row 3: field 'answer': expected a string or a finite number, got nan (id g-2)"
    ]


def test_a_missing_column_is_reported_once_with_the_columns(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pq.write_table(_geometry_table(), path)
    with pytest.raises(ManifestError) as info:
        load_manifest(path, image_dir=tmp_path / "img")
    assert str(info.value).startswith(
        f"{path}: the table has no column for required field(s) question; "
        "its columns are: id, images, problem, answer, source, thumbnail."
    )  # an `images` column is read as the record's images
    with pytest.raises(ManifestError, match=r"field_map names column\(s\) the table does not "):
        load_manifest(path, field_map={**FIELD_MAP, "answer": "solution"})


def test_bytes_that_are_not_an_image_name_the_row(tmp_path: Path) -> None:
    cells = [
        {"bytes": _png(COLOURS[0]), "path": None},
        {"bytes": b"not an image", "path": None},
        {"bytes": None, "path": None},
    ]
    images = pa.array(cells, IMAGE)
    path = tmp_path / "bad.parquet"
    pq.write_table(_geometry_table(images), path)
    loaded = load_manifest(path, field_map=FIELD_MAP, image_dir=tmp_path / "img", skip_invalid=True)
    assert [r["id"] for r in loaded.records] == ["g-0"]
    assert [(p.line, p.field) for p in loaded.problems] == [(2, "image"), (3, "image")]
    assert "the image bytes are not an image PIL can read" in loaded.problems[0].message
    assert loaded.problems[1].message == "the image has neither bytes nor a path (column 'images')"


def test_the_same_bytes_are_written_once_and_never_rewritten(tmp_path: Path) -> None:
    same = {"bytes": _png(COLOURS[1]), "path": None}
    path = tmp_path / "dup.parquet"
    pq.write_table(_geometry_table(pa.array([same, same, same], IMAGE)), path)
    image_dir = tmp_path / "img"

    first = load_manifest(path, field_map=FIELD_MAP, image_dir=image_dir)
    files = list(image_dir.iterdir())
    assert [f.name for f in files] == [Path(first.records[0]["image"]).name]
    assert {r["image"] for r in first.records} == {str(files[0])}
    old = 1_000_000_000_000_000_000  # an mtime (ns) no write could leave behind
    os.utime(files[0], ns=(old, old))

    second = load_manifest(path, field_map=FIELD_MAP, image_dir=image_dir)

    assert second.records == first.records
    assert list(image_dir.iterdir()) == files
    assert files[0].stat().st_mtime_ns == old
    assert files[0].read_bytes() == same["bytes"]


def test_datamodule_setup_on_a_parquet_manifest(tmp_path: Path) -> None:
    path = tmp_path / "train.parquet"
    pq.write_table(_geometry_table(), path)
    data = ManifestDataModule(
        train_manifest=str(path), field_map=FIELD_MAP, image_dir=str(tmp_path / "img")
    )
    data.setup("fit")
    train = data.datasets["train"]
    assert len(train) == 3
    item = train[1]
    assert item["record"]["question"] == "What is x?" and item["record"]["answer"] == "12"
    assert _pixels(item["image"]) == _pixels(Image.open(io.BytesIO(_png(COLOURS[1]))))


def test_pebr_data_validate_a_saved_dataset(tmp_path: Path, capsys, image_cache: Path) -> None:
    folder = _save_to_disk(_geometry_table(), tmp_path / "saved")
    code = main(["validate", str(folder), "--field-map", "question=problem, image=images"])
    assert code == 0
    assert capsys.readouterr().out == f"{folder}: 3 records OK\n"
    assert len(list(image_cache.iterdir())) == 3


def test_pebr_data_validate_with_an_image_dir(tmp_path: Path, capsys) -> None:
    path = tmp_path / "train.parquet"
    pq.write_table(_geometry_table(), path)
    argv = ["validate", str(path), "--field-map", "question=problem,image=images"]
    assert main([*argv, "--image-dir", str(tmp_path / "img")]) == 0
    assert capsys.readouterr().out == f"{path}: 3 records OK\n"
    assert len(list((tmp_path / "img").iterdir())) == 3


@pytest.mark.parametrize("bad", ["question", "question=", "=problem", "a=b,a=c"])
def test_pebr_data_validate_rejects_a_bad_field_map(tmp_path: Path, capsys, bad: str) -> None:
    with pytest.raises(SystemExit) as info:
        main(["validate", str(tmp_path / "t.parquet"), "--field-map", bad])
    assert info.value.code == 2
    assert "--field-map" in capsys.readouterr().err


def test_jsonl_manifests_take_a_field_map_too(write_lines, dataset, tmp_path: Path) -> None:
    _, records = dataset
    line = {"id": "x", "image": records[0]["image"], "problem": "q?", "answer": "1"}
    manifest = write_lines(tmp_path / "mapped.jsonl", [line, {**line, "id": "y", "problem": None}])
    loaded = load_manifest(manifest, field_map={"question": "problem"}, skip_invalid=True)
    assert loaded.records[0]["question"] == "q?" and "problem" not in loaded.records[0]
    assert [str(p) for p in loaded.problems] == [
        f"{manifest}:2: field 'question': expected a string, got null (id y)"
    ]


def test_integer_ids_become_text_and_a_table_without_ids_is_numbered(tmp_path):
    """Public sets often have `pid` integers, or no id at all: 7 -> "7"; without an
    id column, rows are named after the file and their 1-based row number."""
    table = _geometry_table()
    with_ints = table.set_column(0, "id", pa.array([7, 8, 9], pa.int64()))
    pq.write_table(with_ints, tmp_path / "ints.parquet")
    records = load_manifest(tmp_path / "ints.parquet", field_map=FIELD_MAP).records
    assert [r["id"] for r in records] == ["7", "8", "9"]

    pq.write_table(table.drop_columns(["id"]), tmp_path / "geo.parquet")
    records = load_manifest(tmp_path / "geo.parquet", field_map=FIELD_MAP).records
    assert [r["id"] for r in records] == ["geo-1", "geo-2", "geo-3"]
    assert records[1]["question"] == "What is x?"
