"""Manifests stored as tables: a Parquet file or a saved Hugging Face dataset folder.

Public VLM reasoning datasets ship as Parquet, or as the folder that
`datasets.Dataset.save_to_disk` writes (`state.json`, `dataset_info.json` and
`data-0000i-of-0000N.arrow` files in Arrow IPC *stream* format), with the image
stored in the table as bytes. This module reads such a table into plain record
dicts, and writes image bytes out to files, so that a table record ends up
exactly like a JSONL record: `image` holds an absolute path, and everything
downstream stays path-based. `load_manifest` validates the records (docs/data.md).

    pebr data validate data/geo/train.parquet --field-map question=problem,image=images

`datasets` is not needed: pyarrow reads both layouts.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from pebr_lightning.errors import ManifestError
from pebr_lightning.files import cache_dir, write_atomic

# Rows are converted to Python a batch at a time, so that a table of many large
# images never sits in memory as Python bytes all at once.
_BATCH_ROWS = 256

# PIL format -> file extension; any other format uses its lower-cased name.
_EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp"}


class ImageValueError(ValueError):
    """A table cell that cannot be turned into one image file; the message says why."""


def is_table_source(path: str | Path) -> bool:
    """Whether `path` is a Parquet file or a saved-dataset folder rather than JSONL."""
    path = Path(path)
    if path.is_dir():
        return True
    return path.suffix.lower() == ".parquet"


def read_table_rows(path: str | Path) -> list[dict]:
    """All rows of a Parquet file or saved-dataset folder, as dicts of Python values.

    Values are as pyarrow gives them: an HF `Image` cell is {"bytes": ..., "path": ...}.

    Raises:
        ManifestError: The source is missing, is not a table, or cannot be read.
    """
    return list(iter_table_rows(path))


def iter_table_rows(path: str | Path) -> Iterator[dict]:
    """The rows of `read_table_rows`, a batch at a time (same errors)."""
    path = Path(path)
    for batch in _batches(path):
        yield from batch.to_pylist()


DEMO_DATA = "data/demo"
"""Where the demo configs read the embedded synthetic data (`pebr data synth --demo`)."""


def manifest_not_found(path: str | Path) -> ManifestError:
    """The error for a manifest that is not there; under the demo's data folder it
    says how to make it, since that data is written on first use, not shipped."""
    hint = ""
    if DEMO_DATA in Path(path).as_posix():
        hint = (
            "; the demo data is made by `pebr data synth --demo` (or on first use by "
            "`pebr schedule --config configs/demo/schedule.yaml`)"
        )
    return ManifestError(f"manifest not found: {path}{hint}")


def table_schema(path: str | Path) -> pa.Schema:
    """The schema of a table source (column names and types), read without its rows."""
    path = Path(path)
    if path.is_dir():
        with _open_arrow(arrow_files(path)[0]) as reader:
            return reader.schema
    try:
        return pq.read_schema(path)
    except FileNotFoundError:
        raise manifest_not_found(path) from None
    except (OSError, pa.ArrowException) as err:
        raise ManifestError(f"cannot read Parquet file {path}: {err}") from None


def binary_columns(schema: pa.Schema) -> set[str]:
    """Columns that hold binary data anywhere in their type (not JSON-serialisable)."""
    return {f.name for f in schema if _has_binary(f.type)}


def arrow_files(folder: Path) -> list[Path]:
    """The data files of a saved-dataset folder in row order.

    `state.json` lists them (`_data_files`); without it, the `data-*.arrow` files
    (or any `*.arrow`) are taken in name order, which is the order HF writes them in.
    """
    state = folder / "state.json"
    if state.is_file():
        try:
            listed = json.loads(state.read_text(encoding="utf-8"))["_data_files"]
            files = [folder / entry["filename"] for entry in listed]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ManifestError(
                f"{state}: cannot read the list of data files (`_data_files`): {err!r}"
            ) from None
        if not files:
            raise ManifestError(f"{state} lists no data files (`_data_files` is empty)")
        return files
    files = sorted(folder.glob("data-*.arrow")) or sorted(folder.glob("*.arrow"))
    if not files:
        splits = _saved_splits(folder)
        hint = (
            f"; it is a saved DatasetDict: point at one split, e.g. {folder / splits[0]}"
            if splits
            else ""
        )
        raise ManifestError(
            f"{folder} is not a saved dataset: it has no state.json and no *.arrow files{hint}"
        )
    return files


def extract_image(value: object, *, image_dir: Path, base: Path) -> str:
    """Turn an image cell into a path string: bytes are written under `image_dir`.

    Accepts an HF `Image` struct {"bytes", "path"} (bytes win when both are set, as
    in `datasets`), plain bytes, a path string (resolved against `base`, the
    table's folder), or a list holding exactly one of these.

    Raises:
        ImageValueError: The cell holds no image, several images, or bytes that are
            not an image.
    """
    if isinstance(value, list):
        if len(value) != 1:
            count = "an empty list" if not value else f"a list of {len(value)} images"
            raise ImageValueError(f"expected one image per record, got {count}")
        value = value[0]
    if isinstance(value, dict) and set(value) <= {"bytes", "path"}:
        if value.get("bytes") is not None:
            value = value["bytes"]
        elif value.get("path"):
            value = value["path"]
        else:
            raise ImageValueError("the image has neither bytes nor a path")
    if isinstance(value, bytes | bytearray):
        return str(write_image_bytes(bytes(value), image_dir))
    if isinstance(value, str):
        return os.path.normpath(base / value) if value else value
    raise ImageValueError(
        "expected image bytes, a path, an {'bytes', 'path'} image struct or a list of "
        f"one image, got {type(value).__name__ if value is not None else 'null'}"
    )


def write_image_bytes(data: bytes, image_dir: Path) -> Path:
    """Write `data` once to `image_dir/<sha256><ext>` and return that absolute path.

    Named by content, so the same image in many rows, or in a table loaded again,
    is one file that is never rewritten. Written to a temporary file and renamed, so
    a crash or a concurrent loader (one per rank) never leaves a partial image.
    """
    from pebr_lightning.data.images import open_image

    try:
        with open_image(io.BytesIO(data)) as image:
            image_format = image.format or "IMG"
    except (
        UnidentifiedImageError,
        OSError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombError,
    ) as err:
        raise ImageValueError(f"the image bytes are not an image PIL can read: {err}") from None
    suffix = _EXTENSIONS.get(image_format, "." + image_format.lower())
    target = Path(os.path.abspath(image_dir)) / (hashlib.sha256(data).hexdigest() + suffix)
    if target.is_file() and target.stat().st_size == len(data):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(target, data)
    except OSError as err:
        raise ManifestError(f"cannot write image to {target.parent}: {err}") from None
    return target


def default_image_dir() -> Path:
    """Where table images are written: `$PEBR_CACHE/images` (default ~/.cache/pebr_lightning)."""
    return cache_dir() / "images"


def _has_binary(kind: pa.DataType) -> bool:
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return True
    if pa.types.is_fixed_size_binary(kind) or pa.types.is_binary_view(kind):
        return True
    if pa.types.is_dictionary(kind):
        return _has_binary(kind.value_type)
    return any(_has_binary(kind.field(i).type) for i in range(kind.num_fields))


def _batches(path: Path) -> Iterator[pa.RecordBatch]:
    if path.is_dir():
        for file in arrow_files(path):
            with _open_arrow(file) as reader:
                try:
                    yield from reader
                except (OSError, pa.ArrowException) as err:
                    raise ManifestError(f"cannot read Arrow file {file}: {err}") from None
        return
    try:
        parquet = pq.ParquetFile(path)
        yield from parquet.iter_batches(batch_size=_BATCH_ROWS)
    except FileNotFoundError:
        raise manifest_not_found(path) from None
    except (OSError, pa.ArrowException) as err:
        raise ManifestError(f"cannot read Parquet file {path}: {err}") from None


@contextmanager
def _open_arrow(file: Path) -> Iterator[pa.RecordBatchReader]:
    """Open an Arrow file: the stream format HF writes, else the random-access format."""
    try:
        source = pa.memory_map(str(file))
    except FileNotFoundError:
        raise ManifestError(f"data file listed in state.json not found: {file}") from None
    except OSError as err:
        raise ManifestError(f"cannot read Arrow file {file}: {err}") from None
    with source:
        try:
            reader = ipc.open_stream(source)
        except pa.ArrowInvalid:
            source.seek(0)
            try:
                whole = ipc.open_file(source)
            except pa.ArrowInvalid as err:
                raise ManifestError(f"{file} is not an Arrow stream or file: {err}") from None
            batches = (whole.get_batch(i) for i in range(whole.num_record_batches))
            reader = pa.RecordBatchReader.from_batches(whole.schema, batches)
        yield reader


def _saved_splits(folder: Path) -> list[str]:
    """The splits of a saved DatasetDict folder (dataset_dict.json), else []."""
    try:
        return list(json.loads((folder / "dataset_dict.json").read_text("utf-8"))["splits"])
    except (OSError, ValueError, KeyError, TypeError):
        return []
