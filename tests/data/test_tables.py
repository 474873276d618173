"""Parquet files and saved Hugging Face dataset folders as manifests.

The tables are written here with pyarrow in the layouts the public datasets use
(an HF `Image` struct of PNG bytes; `save_to_disk`'s Arrow stream files and
state.json), and loaded without the `datasets` package.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
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


def _save_to_disk(table: pa.Table, folder: Path, shards: int = 1) -> Path:
    """Write `table` in the layout of `datasets.Dataset.save_to_disk`."""
    folder.mkdir(parents=True)
    names = [f"data-{i:05d}-of-{shards:05d}.arrow" for i in range(shards)]
    step = -(-table.num_rows // shards)
    for i, name in enumerate(names):
        with ipc.new_stream(folder / name, table.schema) as writer:
            writer.write_table(table.slice(i * step, step))
    state = {
        "_data_files": [{"filename": name} for name in names],
        "_fingerprint": "0123456789abcdef",
        "_format_type": None,
        "_split": "train",
    }
    (folder / "state.json").write_text(json.dumps(state), encoding="utf-8")
    info = {"features": {name: {"_type": "Value"} for name in table.column_names}}
    (folder / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    return folder


def test_parquet_with_image_structs_and_mapped_columns(tmp_path: Path) -> None:
    path = tmp_path / "geo" / "train.parquet"
    path.parent.mkdir()
    pq.write_table(_geometry_table(), path)
    image_dir = tmp_path / "extracted"

    loaded = load_manifest(path, field_map=FIELD_MAP, image_dir=image_dir)

    assert loaded.problems == [] and loaded.path == path
    assert [r["id"] for r in loaded.records] == ["g-0", "g-1", "g-2"]
    assert [r["question"] for r in loaded.records] == [
        "How many sides?",
        "What is x?",
        "Find the angle.",
    ]
    assert [r["answer"] for r in loaded.records] == ["3", "12", "45"]
    for record, colour in zip(loaded.records, COLOURS, strict=True):
        # Mapped columns are renamed, other columns pass through, binary ones are left out.
        assert set(record) == {"id", "image", "question", "answer", "source"}
        assert os.path.isabs(record["image"])
        assert Path(record["image"]).parent == image_dir and record["image"].endswith(".png")
        assert _pixels(load_image(record["image"])) == _pixels(Image.open(io.BytesIO(_png(colour))))
    assert loaded.records[2]["source"] == "mathverse"


def test_images_go_to_the_pebr_cache_by_default(tmp_path: Path, image_cache: Path) -> None:
    path = tmp_path / "train.parquet"
    pq.write_table(_geometry_table(), path)
    loaded = load_manifest(path, field_map=FIELD_MAP)
    assert {Path(r["image"]).parent for r in loaded.records} == {image_cache}
    assert len(list(image_cache.iterdir())) == 3


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
    _save_to_disk(_geometry_table(), tmp_path / "dd" / "train")
    (tmp_path / "dd" / "dataset_dict.json").write_text('{"splits": ["train"]}', "utf-8")
    with pytest.raises(ManifestError) as info:
        load_manifest(tmp_path / "dd", field_map=FIELD_MAP)
    assert str(info.value) == (
        f"{tmp_path / 'dd'} is not a saved dataset: it has no state.json and no *.arrow files; "
        f"it is a saved DatasetDict: point at one split, e.g. {tmp_path / 'dd' / 'train'}"
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


def test_a_list_of_two_images_names_the_row_and_field(tmp_path: Path) -> None:
    one = {"bytes": _png(COLOURS[0]), "path": None}
    images = pa.array([[one], [one, one], [one]], pa.list_(IMAGE))
    path = tmp_path / "two.parquet"
    pq.write_table(_geometry_table(images), path)

    with pytest.raises(ManifestError) as info:
        load_manifest(path, field_map=FIELD_MAP, image_dir=tmp_path / "img")
    assert (
        f"{path}:row 2: field 'image': expected one image per record, got a list of 2 images "
        "(column 'images') (id g-1)"
    ) in str(info.value)
    assert "1 problem(s) on 1 row(s)" in str(info.value)

    loaded = load_manifest(path, field_map=FIELD_MAP, image_dir=tmp_path / "img", skip_invalid=True)
    assert [r["id"] for r in loaded.records] == ["g-0", "g-2"]
    assert [(p.line, p.field, p.unit) for p in loaded.problems] == [(2, "image", "row")]


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
        f"{path}: the table has no column for required field(s) image, question; "
        "its columns are: id, images, problem, answer, source, thumbnail."
    )
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
