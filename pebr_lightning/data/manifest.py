"""The manifest schema (one JSON object per line) and its validation.

Every stage reads its samples through `load_manifest`, so a bad line is reported
once, before training starts, as `file:line: field 'name': what is wrong`,
instead of as a crash in a data-loader worker an hour later. A manifest may also
be a table (a Parquet file or a saved Hugging Face dataset folder, read by
tables.py); its rows go through the same checks and are reported as
`file:row N: ...`. The schema is documented in docs/data.md.

    pebr data validate data/shapes/manifest.jsonl [--skip-invalid]
    pebr data validate data/geo/train.parquet --field-map question=problem,image=images
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from pebr_lightning.data import tables
from pebr_lightning.errors import ManifestError

REQUIRED_FIELDS = ("id", "image", "question", "answer")
DEFAULT_TYPE = "all"
"""The question type of a record without a `type` field (metrics by type count it so)."""
MAX_LISTED_PROBLEMS = 20

_IMAGE_ERRORS = (
    OSError,
    UnidentifiedImageError,
    SyntaxError,
    ValueError,
    Image.DecompressionBombError,
)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one manifest line (or table row)."""

    path: str
    """The manifest file, as it was given."""
    line: int
    """1-based line number in the manifest, or 1-based row number in a table."""
    field: str | None
    """The offending field, or None when the whole line is at fault."""
    message: str
    """What is wrong, in words a user can act on."""
    sample_id: str | None
    """The record's `id` where the line has one."""
    unit: str = "line"
    """What `line` counts: "line" (JSONL) or "row" (Parquet, saved dataset)."""

    def __str__(self) -> str:
        # Rows say so, because row N of a table is not line N of any file.
        number = f"row {self.line}" if self.unit == "row" else str(self.line)
        where = f"{self.path}:{number}: "
        if self.field is not None:
            where += f"field '{self.field}': "
        suffix = f" (id {self.sample_id})" if self.sample_id is not None else ""
        return f"{where}{self.message}{suffix}"


@dataclass
class LoadedManifest:
    """The valid records of a manifest and the problems of the lines that were skipped."""

    path: Path
    """The manifest file (or saved-dataset folder)."""
    records: list[dict]
    """Valid records in file order; `image` holds the absolute image path."""
    problems: list[Problem]
    """Every problem found (empty unless `skip_invalid` was set)."""

    @property
    def skipped_lines(self) -> int:
        """How many records were left out because of problems."""
        return len({p.line for p in self.problems})


def load_manifest(
    path: str | Path,
    *,
    check_images: bool = True,
    skip_invalid: bool = False,
    field_map: Mapping[str, str] | None = None,
    image_dir: str | Path | None = None,
) -> LoadedManifest:
    """Read and validate a manifest: JSONL, a Parquet file, or a saved HF dataset folder.

    Args:
        path: A `.jsonl` file, a `.parquet` file, or a folder written by
            `datasets.Dataset.save_to_disk`; relative `image` paths are resolved
            against the file's folder (the folder itself for a saved dataset).
        check_images: Open and fully decode every image, so that a missing, unreadable
            or truncated file is reported here rather than during training.
        skip_invalid: Drop invalid records and return their problems instead of raising.
        field_map: Our field -> the name it has in the source, e.g.
            {"question": "problem", "image": "images"}; applied before validation.
        image_dir: Where image bytes from a table are written (default
            `$PEBR_CACHE/images`); unused for JSONL.

    Raises:
        ManifestError: The file is missing or empty, it has invalid records and
            `skip_invalid` is False, or no valid record is left.
    """
    path = Path(path)
    field_map = dict(field_map or {})
    if tables.is_table_source(path):
        base = Path(os.path.abspath(path if path.is_dir() else path.parent))
        rows = _table_records(path, field_map, image_dir, base)
        unit = "row"
    else:
        base = Path(os.path.abspath(path.parent))
        rows = _jsonl_records(path, field_map)
        unit = "line"

    source = _Source(str(path), base, unit, check_images, field_map)
    records: list[dict] = []
    problems: list[Problem] = []
    count = 0
    for number, record, known in rows:
        count += 1
        checked, found = _check_record(record, number, source, known)
        if found:
            problems.extend(found)
        else:
            records.append(checked)

    if count == 0:
        raise ManifestError(f"manifest {path} is empty: it has no records")
    if problems and not skip_invalid:
        raise ManifestError(
            f"{path} has invalid records; {_summary(problems)}\n"
            f"Fix these {unit}s, or skip the invalid records with "
            "`data.init_args.skip_invalid: true` (training) or `--skip-invalid` "
            "(pebr data validate)."
        )
    if not records:
        raise ManifestError(f"{path} has no valid records; {_summary(problems)}")
    return LoadedManifest(path=path, records=records, problems=problems)


DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
"""Largest image decoded (width x height): 120 MB as RGB. PEBR_MAX_IMAGE_PIXELS changes
it; PEBR_RESIZE_LARGE_IMAGES=1 shrinks larger ones to it instead of refusing them."""


def max_image_pixels() -> int:
    value = os.environ.get("PEBR_MAX_IMAGE_PIXELS", "")
    return int(value) if value.strip().isdigit() else DEFAULT_MAX_IMAGE_PIXELS


IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
"""The formats an image is opened as: what VLM data holds. Pillow would otherwise try
every plugin it has, EPS among them, which runs Ghostscript on the file."""

MAX_ASPECT_RATIO = 200
"""Qwen-VL's image processor refuses a longer side over 200x the shorter one."""


def open_image(source: Any) -> Image.Image:
    """`Image.open` limited to IMAGE_FORMATS (a path or a binary file)."""
    return Image.open(source, formats=IMAGE_FORMATS)


def image_problem(path: str | Path, image: Image.Image, limit: int | None = None) -> str | None:
    """What is wrong with an opened (not yet decoded) image, from its header alone:
    too long and thin for the processor, or more memory decoded than the limit allows."""
    width, height = image.size
    if min(width, height) < 1:
        return f"image {path} is {width} x {height}: empty"
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        return (
            f"image {path} is {width} x {height}: its aspect ratio is over "
            f"{MAX_ASPECT_RATIO}, which the Qwen-VL processor refuses; crop or pad it"
        )
    limit = max_image_pixels() if limit is None else limit
    if decoded_pixels(image) > limit:
        return oversized(path, image, limit)
    return None


def decoded_pixels(image: Image.Image) -> int:
    """Pixels of the image weighted by memory: decoding and converting a mode wider
    than 8-bit RGB (16/32-bit, float, CMYK) costs more per pixel, so the pixel limit
    (set for RGB, 3 bytes a pixel) counts such images as larger."""
    return image.width * image.height * max(3, _bytes_per_pixel(image.mode)) // 3


def _bytes_per_pixel(mode: str) -> int:
    from PIL import ImageMode

    try:
        spec = ImageMode.getmode(mode)
    except KeyError:
        return 4
    item = int(spec.typestr[-1]) if spec.typestr[-1].isdigit() else 1
    return max(1, item * len(spec.bands))


def load_image(path: str | Path) -> Image.Image:
    """Open an image as RGB, upright as its EXIF orientation says; an unreadable,
    oversized or too thin file raises ManifestError naming it.

    The size is read from the header before any pixel is decoded: a 10000 x 10000 PNG
    would take 0.9 GB per load. Over `max_image_pixels()` it is refused, or shrunk to
    it (aspect kept) with PEBR_RESIZE_LARGE_IMAGES=1; JPEGs shrink while decoding.
    A phone photo stored sideways with an orientation tag is turned as every viewer
    turns it: the model should see what the person who wrote the question saw.
    """
    try:
        with open_image(path) as image:
            limit = max_image_pixels()
            problem = image_problem(path, image, limit)
            if problem is not None and not (
                decoded_pixels(image) > limit and _resizing() and "aspect" not in problem
            ):
                raise ManifestError(problem)
            if problem is not None:
                scale = math.sqrt(limit / decoded_pixels(image))
                size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
                image.draft("RGB", size)  # JPEG: decode at a reduced scale already
                rgb = to_rgb(image)
                rgb.thumbnail(size)
                return upright(image, rgb)
            return upright(image, to_rgb(image))
    except _IMAGE_ERRORS as err:
        raise ManifestError(f"cannot read image {path}: {err}") from None


def _resizing() -> bool:
    return os.environ.get("PEBR_RESIZE_LARGE_IMAGES", "") in ("1", "true", "yes")


# EXIF orientation (tag 0x0112) -> the transposition that makes the picture upright.
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def upright(original: Image.Image, rgb: Image.Image) -> Image.Image:
    """`rgb` (decoded from `original`) turned as `original`'s EXIF orientation says."""
    method = _UPRIGHT.get(original.getexif().get(0x0112, 1))
    return rgb if method is None else rgb.transpose(method)


def oversized(path: str | Path, image: Image.Image, limit: int) -> str:
    return (
        f"image {path} is {image.width} x {image.height} = {image.width * image.height:,} "
        f"pixels, over the limit of {limit:,}: resize it, raise PEBR_MAX_IMAGE_PIXELS, or "
        "set PEBR_RESIZE_LARGE_IMAGES=1 to shrink such images when they are read"
    )


# 16-bit and 32-bit single-channel modes; PIL's convert("RGB") clips them to 0..255,
# which turns a 16-bit picture almost entirely white.
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB as a person sees the file: transparency over white, 16-bit scaled.

    - Transparency (an alpha channel, or a palette / colour-key `transparency`) is
      composited onto white, as viewers show diagrams and screenshots; a plain
      convert("RGB") drops alpha and shows the (usually black) hidden colour.
    - 16-bit pixels (0..65535) are scaled to 0..255; 32-bit integer pixels too when
      they exceed 255; float pixels within 0..1 are taken as 0..1.
    """
    if image.mode in _WIDE_MODES:
        import numpy as np

        values = np.asarray(image)  # its own dtype: 2 or 4 bytes a pixel
        top = float(values.max()) if values.size else 0.0
        if image.mode.startswith("I;16") or (image.mode == "I" and top > 255):
            scale = 255.0 / 65535.0
        elif image.mode == "F" and top <= 1.0:
            scale = 255.0
        else:
            scale = 1.0
        # Scaled in blocks of rows: one float copy of a 40 MP picture is 160 MB more.
        gray = np.empty(values.shape, dtype=np.uint8)
        for start in range(0, values.shape[0], 256):
            block = values[start : start + 256].astype(np.float32) * np.float32(scale)
            gray[start : start + 256] = np.clip(np.rint(block), 0, 255)
        del values
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


@dataclass
class _Source:
    """What the record checks need to know about the manifest being read."""

    path: str
    base: Path
    unit: str
    check_images: bool
    field_map: dict[str, str]
    seen_ids: dict[str, int] = field(default_factory=dict)

    def problem(self, number: int, name: str | None, message: str, record: dict) -> Problem:
        return Problem(self.path, number, name, message, _sample_id(record), self.unit)


# Each yields (number, record, problems found before the record checks); a record
# of {} with a problem of field None stands for a line that is not a record at all.
_Rows = Iterable[tuple[int, dict, list[tuple[str | None, str]]]]


def _jsonl_records(path: Path, field_map: dict[str, str]) -> _Rows:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise tables.manifest_not_found(path) from None
    except OSError as err:
        raise ManifestError(f"cannot read manifest {path}: {err}") from None
    for number, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        record, problem = _parse_line(raw, number)
        if problem is not None:
            yield number, {}, [(None, problem)]
        else:
            yield number, _apply_field_map(record, field_map), []


def _parse_line(raw: bytes, number: int) -> tuple[dict, str | None]:
    """Parse one JSONL line into a record, or say why it is not one."""
    try:
        text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
    except UnicodeDecodeError as err:
        return {}, f"line is not valid UTF-8: {err}"
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        return {}, f"malformed JSON: {err}"
    if not isinstance(record, dict):
        return {}, f"expected a JSON object, got {_type_name(record)}"
    return record, None


def _table_records(
    path: Path, field_map: dict[str, str], image_dir: str | Path | None, base: Path
) -> _Rows:
    schema = tables.table_schema(path)
    columns = schema.names
    absent = {ours: theirs for ours, theirs in field_map.items() if theirs not in columns}
    if absent and columns:
        wanted = ", ".join(f"{ours} <- '{theirs}'" for ours, theirs in absent.items())
        raise ManifestError(
            f"{path}: field_map names column(s) the table does not have ({wanted}); "
            f"its columns are: {', '.join(columns)}"
        )
    # A whole column missing is one problem, not one per row.
    mapped = {ours for ours, theirs in field_map.items() if theirs in columns}
    lacking = [name for name in REQUIRED_FIELDS if name not in columns and name not in mapped]
    # Many public datasets have no id column: the row number names the sample then.
    number_ids = "id" in lacking
    lacking = [name for name in lacking if name != "id"]
    if lacking and columns:
        raise ManifestError(
            f"{path}: the table has no column for required field(s) {', '.join(lacking)}; "
            f"its columns are: {', '.join(columns)}. Name the columns to read them from "
            "with field_map (--field-map question=problem,image=images)"
        )
    # Binary columns (a second image, audio) cannot be written as JSON; they are not ours.
    binary = tables.binary_columns(schema) - {field_map.get("image", "image")}
    image_dir = Path(image_dir) if image_dir is not None else tables.default_image_dir()
    for number, row in enumerate(tables.iter_table_rows(path), start=1):
        row = {k: v for k, v in row.items() if k not in binary}
        record = _apply_field_map(row, field_map)
        if number_ids:
            record["id"] = f"{path.stem}-{number}"
        record, known = _table_record(record, image_dir, base)
        # Name the column too where it differs, since that is what the user looks at.
        known = [
            (name, f"{message} (column '{field_map[name]}')" if name in field_map else message)
            for name, message in known
        ]
        yield number, record, known


def _table_record(
    record: dict, image_dir: Path, base: Path
) -> tuple[dict, list[tuple[str | None, str]]]:
    """Make a table row look like a JSONL record: image as a path, answer as text."""
    # A column exists in every row, so a null in one of our fields means "absent".
    record = {k: v for k, v in record.items() if not (v is None and k in _FIELD_CHECKS)}
    known: list[tuple[str | None, str]] = []
    if isinstance(record.get("id"), int) and not isinstance(record["id"], bool):
        record["id"] = str(record["id"])  # integer ids (`pid` columns) are common
    answer = record.get("answer")
    if isinstance(answer, int | float) and not isinstance(answer, bool):
        if isinstance(answer, float) and not math.isfinite(answer):
            known.append(("answer", f"expected a string or a finite number, got {answer}"))
        else:
            record["answer"] = _number_text(answer)
    if "image" in record:
        try:
            record["image"] = tables.extract_image(record["image"], image_dir=image_dir, base=base)
        except tables.ImageValueError as err:
            known.append(("image", str(err)))
    return record, known


def _number_text(number: int | float) -> str:
    # Float columns often hold whole numbers (an int column with gaps); 3.0 means "3".
    if isinstance(number, float) and number.is_integer():
        return str(int(number))
    return str(number)


def _apply_field_map(record: dict, field_map: dict[str, str]) -> dict:
    """Rename the source's fields to ours; a mapped field replaces one of the same name."""
    if not field_map:
        return record
    theirs = set(field_map.values())
    renamed = {k: v for k, v in record.items() if k not in theirs}
    for ours, name in field_map.items():
        if name in record:
            renamed[ours] = record[name]
    return renamed


def _check_record(
    record: dict, number: int, source: _Source, known: list[tuple[str | None, str]]
) -> tuple[dict, list[Problem]]:
    """Check one record; return it (image resolved) and its problems.

    `known` are problems found while reading the record; their fields are not
    checked again, so each field is reported once.
    """
    found = [source.problem(number, name, message, record) for name, message in known]
    if any(name is None for name, _ in known):
        return record, found
    done = {name for name, _ in known}

    for name in REQUIRED_FIELDS:
        if name not in record and name not in done:
            message = "required field is missing"
            if name in source.field_map:
                message += f" (field_map reads it from '{source.field_map[name]}')"
            found.append(source.problem(number, name, message, record))
    for name, (check, expected) in _FIELD_CHECKS.items():
        if name in record and name not in done and not check(record[name]):
            got = "an empty string" if record[name] == "" else _type_name(record[name])
            found.append(source.problem(number, name, f"expected {expected}, got {got}", record))

    sample_id = _sample_id(record)
    if sample_id is not None:
        if sample_id in source.seen_ids:
            first = source.seen_ids[sample_id]
            message = f"duplicate id, first used on {source.unit} {first}"
            found.append(source.problem(number, "id", message, record))
        else:
            source.seen_ids[sample_id] = number

    image = record.get("image")
    if isinstance(image, str) and image and "image" not in done:
        resolved = os.path.normpath(source.base / image)  # an absolute `image` replaces `base`
        if source.check_images:
            message = _image_problem(resolved)
            if message is not None:
                found.append(source.problem(number, "image", message, record))
        record = {**record, "image": resolved}
    return record, found


def _sample_id(record: dict) -> str | None:
    sample_id = record.get("id")
    return sample_id if isinstance(sample_id, str) and sample_id else None


def _image_problem(path: str) -> str | None:
    if not os.path.isfile(path):
        return f"image file not found: {path}"
    try:
        with open_image(path) as image:
            problem = image_problem(path, image)
            if problem is not None and ("aspect" in problem or not _resizing()):
                return problem  # found from the header: nothing decoded
            image.load()
    except _IMAGE_ERRORS as err:
        return f"image unreadable or truncated: {path}: {err}"
    return None


def _summary(problems: list[Problem]) -> str:
    lines = len({p.line for p in problems})
    head = f"{len(problems)} problem(s) on {lines} {problems[0].unit}(s):"
    listed = [f"  {p}" for p in problems[:MAX_LISTED_PROBLEMS]]
    if len(problems) > MAX_LISTED_PROBLEMS:
        listed.append(f"  ... and {len(problems) - MAX_LISTED_PROBLEMS} more")
    return "\n".join([head, *listed])


def _type_name(value: object) -> str:
    names = {dict: "object", list: "list", str: "str", bool: "bool", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _is_nonempty_str(value: object) -> bool:
    return isinstance(value, str) and value != ""


def _is_str(value: object) -> bool:
    return isinstance(value, str)


def _is_str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_keywords(value: object) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and _is_str_list(v) for k, v in value.items()
    )


# field -> (check, what was expected); fields not listed pass through untouched.
_FIELD_CHECKS = {
    "id": (_is_nonempty_str, "a non-empty string"),
    "image": (_is_nonempty_str, "a non-empty string (path to an image file)"),
    "question": (_is_str, "a string"),
    "answer": (_is_str, "a string"),
    "type": (_is_str, "a string"),
    "choices": (_is_str_list, "a list of strings"),
    "description": (_is_str, "a string"),
    "rationale": (_is_str, "a string"),
    "reasoning": (lambda v: _is_str(v) or _is_str_list(v), "a string or a list of strings"),
    "keywords": (_is_keywords, "an object mapping names to lists of strings"),
}
