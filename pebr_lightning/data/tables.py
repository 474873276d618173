"""Manifests held as datasets: Parquet, saved Hugging Face datasets, hub ids.

Public VLM reasoning datasets ship as Parquet, as the folder
`datasets.Dataset.save_to_disk` writes, or as a hub repository (Parquet shards and a
dataset card), with the image stored in the table as bytes. The `datasets` library
reads all of them (with its caching, and the hub where there is one); this module
names them and turns their rows into plain record dicts, writing image bytes out to
files, so that a table record ends up exactly like a JSONL record: `image` holds an
absolute path, and everything downstream stays path-based. `load_manifest` validates
the records (docs/data.md). A source is one of:

- a `.parquet` file;
- a folder written by `save_to_disk` (a `DatasetDict` folder names its split:
  `data/geo@train`);
- a folder laid out as a hub dataset repository (data files, optional card), with
  `@split` where it has several splits;
- a hub id, `owner/name`, `owner/name@split` or `owner/name:config@split`
  (default split: the only one, else `train`).

Images are not decoded while loading: image columns are read as their bytes and
written out by content hash, and decoded by the data loader when a batch needs them
(`check_images` decodes each once to validate, and is what a very large set turns off).

    pebr data validate data/geo/train.parquet --field-map question=problem,image=images
    pebr data validate AI4Math/MathVista@testmini --field-map question=query,image=decoded_image
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from pebr_lightning.errors import ManifestError
from pebr_lightning.files import cache_dir, write_atomic

# Rows are converted to Python a batch at a time, so that a table of many large
# images never sits in memory as Python bytes all at once.
_BATCH_ROWS = 256

# PIL format -> file extension; any other format uses its lower-cased name.
_EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp"}

# owner/name, owner/name@split, owner/name:config@split (hub names: letters, digits, -_.)
_HUB_ID = re.compile(
    r"^(?P<name>[\w.-]+/[\w.-]+)(?::(?P<config>[\w.-]+))?(?:@(?P<split>[\w.\[\]:%+-]+))?$"
)
# A local source with a split: `folder@split`.
_LOCAL_SPLIT = re.compile(r"^(?P<path>.+)@(?P<split>[\w.-]+)$")


class ImageValueError(ValueError):
    """A table cell that cannot be turned into one image file; the message says why."""


@dataclass(frozen=True)
class TableSource:
    """Where a table manifest comes from: a local path, or a hub id."""

    spec: str
    """The manifest as the user wrote it (messages quote it)."""
    path: Path | None
    """The local file or folder; None for a hub dataset."""
    hub_id: str | None = None
    config: str | None = None
    split: str | None = None

    @property
    def base(self) -> Path:
        """What relative image paths in the table are resolved against."""
        if self.path is None:
            return Path.cwd()
        return Path(os.path.abspath(self.path if self.path.is_dir() else self.path.parent))

    @property
    def stem(self) -> str:
        """A short name for ids made from row numbers."""
        if self.path is not None:
            return self.path.stem
        return (self.hub_id or self.spec).rsplit("/", 1)[-1]


def table_source(spec: str | Path) -> TableSource | None:
    """The table source `spec` names, or None when it is a JSONL manifest."""
    text = str(spec)
    path = Path(text)
    if path.exists():
        if path.is_dir() or path.suffix.lower() == ".parquet":
            return TableSource(text, path)
        return None
    local = _LOCAL_SPLIT.match(text)
    if local and Path(local["path"]).is_dir():
        return TableSource(text, Path(local["path"]), split=local["split"])
    if path.suffix.lower() == ".parquet":
        return TableSource(text, path)  # missing: reported when read
    hub = _HUB_ID.match(text)
    if hub and not text.lower().endswith((".jsonl", ".json")):
        # As `datasets.load_dataset` does: a folder of that name here wins over the hub.
        local = Path(hub["name"]) if Path(hub["name"]).is_dir() else None
        return TableSource(text, local, hub["name"], hub["config"], hub["split"])
    return None


def is_table_source(path: str | Path) -> bool:
    """Whether `path` names a table (Parquet, a dataset folder, a hub id) rather than JSONL."""
    return table_source(path) is not None


def open_table(source: TableSource) -> Any:
    """The `datasets.Dataset` of `source` (rows are read from it undecoded, `iter_rows`)."""
    import datasets

    try:
        if source.path is not None and not source.path.exists():
            raise manifest_not_found(source.spec)
        if source.path is not None and source.path.is_file():
            loaded = datasets.load_dataset("parquet", data_files=str(source.path), split="train")
        elif source.path is not None and _is_saved(source.path):
            loaded = _pick_split(source, datasets.load_from_disk(str(source.path)))
        elif source.path is not None:
            loaded = _pick_split(source, datasets.load_dataset(str(source.path), source.config))
        else:
            loaded = _pick_split(
                source, datasets.load_dataset(source.hub_id, source.config, split=source.split)
            )
    except ManifestError:
        raise
    except FileNotFoundError as err:
        raise ManifestError(f"{source.spec}: not found: {err}") from None
    except Exception as err:  # datasets raises many kinds: name the source and the cause
        where = "hub dataset" if source.path is None else "dataset"
        cause = f" ({type(err.__cause__).__name__}: {err.__cause__})" if err.__cause__ else ""
        raise ManifestError(
            f"cannot read {where} {source.spec}: {type(err).__name__}: {err}{cause}"
        ) from None
    return loaded


def read_table_rows(path: str | Path) -> list[dict]:
    """All rows of a table source, as dicts of Python values.

    An image cell is {"bytes": ..., "path": ...} (undecoded), as in `datasets`.

    Raises:
        ManifestError: The source is missing, is not a table, or cannot be read.
    """
    return list(iter_table_rows(path))


def iter_table_rows(path: str | Path) -> Iterator[dict]:
    """The rows of `read_table_rows`, a batch at a time (same errors)."""
    yield from iter_rows(open_table(_require_table(path)))


def iter_rows(table: Any) -> Iterator[dict]:
    """The rows of an opened table, a batch at a time, as Arrow holds them: an image
    cell stays {"bytes", "path"}, never decoded here."""
    for batch in table.with_format("arrow").iter(batch_size=_BATCH_ROWS):
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


def table_schema(table: Any) -> pa.Schema:
    """The Arrow schema of an opened table (column names and types)."""
    return table.data.schema


def binary_columns(schema: pa.Schema) -> set[str]:
    """Columns that hold binary data anywhere in their type (not JSON-serialisable)."""
    return {f.name for f in schema if _has_binary(f.type)}


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


def _require_table(path: str | Path) -> TableSource:
    source = table_source(path)
    if source is None:
        raise ManifestError(f"{path} is not a table (Parquet, a dataset folder or a hub id)")
    return source


def _is_saved(folder: Path) -> bool:
    """Whether `folder` was written by `save_to_disk` (a Dataset or a DatasetDict)."""
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def _pick_split(source: TableSource, loaded: Any) -> Any:
    """The split `source` names of a DatasetDict (its only one, or `train`, if unnamed)."""
    import datasets

    if not isinstance(loaded, datasets.DatasetDict | dict):
        if source.split is not None and source.path is not None:
            raise ManifestError(f"{source.spec}: {source.path} holds one dataset, not splits")
        return loaded
    names = list(loaded)
    split = source.split
    if split is None:
        if len(names) == 1:
            split = names[0]
        elif "train" in names:
            split = "train"
        else:
            raise ManifestError(
                f"{source.spec} has splits {', '.join(names)}: name one, "
                f"e.g. {source.spec}@{names[0]}"
            )
    if split not in loaded:
        raise ManifestError(
            f"{source.spec}: no split {split!r}; its splits are: {', '.join(names)}"
        )
    return loaded[split]


def _has_binary(kind: pa.DataType) -> bool:
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return True
    if pa.types.is_fixed_size_binary(kind) or pa.types.is_binary_view(kind):
        return True
    if pa.types.is_dictionary(kind):
        return _has_binary(kind.value_type)
    return any(_has_binary(kind.field(i).type) for i in range(kind.num_fields))
