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

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pebr_lightning.data import tables
from pebr_lightning.data.conversations import (
    IMAGE_PLACEHOLDER,
    conversation_key,
    conversation_problems,
)
from pebr_lightning.data.images import (
    IMAGE_ERRORS,
    image_paths,
    image_problem,
    open_image,
    resizing,
)
from pebr_lightning.data.rows import (
    json_array_records,
    jsonl_records,
    table_records,
    type_name,
)
from pebr_lightning.errors import ManifestError

REQUIRED_FIELDS = ("id", "image", "question", "answer")
DEFAULT_TYPE = "all"
"""The question type of a record without a `type` field (metrics by type count it so)."""
MAX_LISTED_PROBLEMS = 20


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
    """What `line` counts: "line" (JSONL), "row" (a table) or "record" (a JSON array)."""

    def __str__(self) -> str:
        # Rows and records say so, because row N of a table is not line N of any file.
        number = str(self.line) if self.unit == "line" else f"{self.unit} {self.line}"
        where = f"{self.path}:{number}: "
        if self.field is not None:
            where += f"field '{self.field}': "
        suffix = f" (id {self.sample_id})" if self.sample_id is not None else ""
        return f"{where}{self.message}{suffix}"


@dataclass
class LoadedManifest:
    """The valid records of a manifest and the problems of the lines that were skipped."""

    path: Path
    """The manifest file, dataset folder or hub id, as given."""
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
        path: A `.jsonl` file, a `.parquet` file, a folder written by
            `datasets.Dataset.save_to_disk` (`folder@split` for a DatasetDict), a
            folder laid out as a hub dataset repository, or a hub id
            (`owner/name[:config][@split]`, tables.py); relative `image` paths are
            resolved against the file's folder (the folder itself for a folder).
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
    field_map = dict(field_map or {})
    table = tables.table_source(path)
    if table is not None:
        base = table.base
        rows = table_records(
            table,
            field_map,
            image_dir,
            required=REQUIRED_FIELDS,
            our_fields=frozenset(_FIELD_CHECKS),
        )
        unit = "row"
    else:
        path = Path(path)
        base = Path(os.path.abspath(path.parent))
        if path.suffix.lower() == ".json":
            rows = json_array_records(path, field_map)
            unit = "record"
        else:
            rows = jsonl_records(path, field_map)
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
    return LoadedManifest(path=Path(path), records=records, problems=problems)


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
    if conversation_key(record) is not None:
        return _check_conversation(record, number, source, found)

    several = "images" in record
    if several and "image" in record:
        found.append(source.problem(number, "images", "give `image` or `images`, not both", record))
    for name in REQUIRED_FIELDS:
        if name == "image" and several:
            continue
        if name not in record and name not in done:
            message = "required field is missing"
            if name in source.field_map:
                message += f" (field_map reads it from '{source.field_map[name]}')"
            found.append(source.problem(number, name, message, record))
    for name, (check, expected) in _FIELD_CHECKS.items():
        if name in record and name not in done and not check(record[name]):
            got = "an empty string" if record[name] == "" else type_name(record[name])
            found.append(source.problem(number, name, f"expected {expected}, got {got}", record))

    _check_id(record, number, source, found)
    if several and "images" not in done:
        return _check_images(record, number, source, found)

    image = record.get("image")
    if isinstance(image, str) and image and "image" not in done:
        resolved = os.path.normpath(source.base / image)  # an absolute `image` replaces `base`
        if source.check_images:
            message = _image_problem(resolved)
            if message is not None:
                found.append(source.problem(number, "image", message, record))
        record = {**record, "image": resolved}
    return record, found


def _check_conversation(
    record: dict, number: int, source: _Source, found: list[Problem]
) -> tuple[dict, list[Problem]]:
    """The checks of a ShareGPT / messages record (data/conversations.py): its turns,
    its images (resolved and opened like `image`), and an id from the line number where
    it has none, as such data rarely carries ids."""
    if "id" not in record:
        record = {**record, "id": f"{Path(source.path).stem}-{number}"}
    for name, message in conversation_problems(record):
        found.append(source.problem(number, name, message, record))
    for name in ("id", "type"):
        check, expected = _FIELD_CHECKS[name]
        if name in record and not check(record[name]):
            found.append(source.problem(number, name, f"expected {expected}", record))
    _check_id(record, number, source, found)
    if found:
        return record, found
    resolved = [os.path.normpath(source.base / p) for p in image_paths(record)]
    if source.check_images:
        for index, path in enumerate(resolved):
            message = _image_problem(path)
            if message is not None:
                found.append(source.problem(number, f"images[{index}]", message, record))
    record = {k: v for k, v in record.items() if k != "image"}
    return {**record, "images": resolved}, found


def _check_images(
    record: dict, number: int, source: _Source, found: list[Problem]
) -> tuple[dict, list[Problem]]:
    """A question record's `images`: a non-empty list of paths, resolved and opened
    like `image`; `<image>` placeholders in the question, if any, one per image."""
    images = record["images"]
    if not isinstance(images, list) or not images or not all(_is_nonempty_str(p) for p in images):
        message = "expected a non-empty list of image paths (non-empty strings)"
        found.append(source.problem(number, "images", message, record))
        return record, found
    question = record.get("question")
    marks = question.count(IMAGE_PLACEHOLDER) if isinstance(question, str) else 0
    if marks and marks != len(images):
        message = (
            f"the question holds {marks} {IMAGE_PLACEHOLDER} placeholder(s) for "
            f"{len(images)} images (put one per image, or none: the images then come first)"
        )
        found.append(source.problem(number, "question", message, record))
    resolved = [os.path.normpath(source.base / p) for p in images]
    if source.check_images:
        for index, path in enumerate(resolved):
            message = _image_problem(path)
            if message is not None:
                found.append(source.problem(number, f"images[{index}]", message, record))
    return {**record, "images": resolved}, found


def _check_id(record: dict, number: int, source: _Source, found: list[Problem]) -> None:
    sample_id = _sample_id(record)
    if sample_id is not None:
        if sample_id in source.seen_ids:
            first = source.seen_ids[sample_id]
            message = f"duplicate id, first used on {source.unit} {first}"
            found.append(source.problem(number, "id", message, record))
        else:
            source.seen_ids[sample_id] = number


def _sample_id(record: dict) -> str | None:
    sample_id = record.get("id")
    return sample_id if isinstance(sample_id, str) and sample_id else None


def _image_problem(path: str) -> str | None:
    if not os.path.isfile(path):
        return f"image file not found: {path}"
    try:
        with open_image(path) as image:
            problem = image_problem(path, image)
            if problem is not None and ("aspect" in problem or not resizing()):
                return problem  # found from the header: nothing decoded
            image.load()
    except IMAGE_ERRORS as err:
        return f"image unreadable or truncated: {path}: {err}"
    return None


def _summary(problems: list[Problem]) -> str:
    lines = len({p.line for p in problems})
    head = f"{len(problems)} problem(s) on {lines} {problems[0].unit}(s):"
    listed = [f"  {p}" for p in problems[:MAX_LISTED_PROBLEMS]]
    if len(problems) > MAX_LISTED_PROBLEMS:
        listed.append(f"  ... and {len(problems) - MAX_LISTED_PROBLEMS} more")
    return "\n".join([head, *listed])


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
