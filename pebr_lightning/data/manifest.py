"""The manifest schema (one JSON object per line) and its validation.

Every stage reads its samples through `load_manifest`, so a bad line is reported
once, before training starts, as `file:line: field 'name': what is wrong`,
instead of as a crash in a data-loader worker an hour later. The schema is
documented in docs/data.md.

    pebr data validate data/shapes/manifest.jsonl [--skip-invalid]
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from pebr_lightning.errors import ManifestError

REQUIRED_FIELDS = ("id", "image", "question", "answer")
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
    """One thing wrong with one manifest line."""

    path: str
    """The manifest file, as it was given."""
    line: int
    """1-based line number in the manifest."""
    field: str | None
    """The offending field, or None when the whole line is at fault."""
    message: str
    """What is wrong, in words a user can act on."""
    sample_id: str | None
    """The record's `id` where the line has one."""

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}: "
        if self.field is not None:
            where += f"field '{self.field}': "
        suffix = f" (id {self.sample_id})" if self.sample_id is not None else ""
        return f"{where}{self.message}{suffix}"


@dataclass
class LoadedManifest:
    """The valid records of a manifest and the problems of the lines that were skipped."""

    path: Path
    """The manifest file."""
    records: list[dict]
    """Valid records in file order; `image` holds the absolute image path."""
    problems: list[Problem]
    """Every problem found (empty unless `skip_invalid` was set)."""

    @property
    def skipped_lines(self) -> int:
        """How many records were left out because of problems."""
        return len({p.line for p in self.problems})


def load_manifest(
    path: str | Path, *, check_images: bool = True, skip_invalid: bool = False
) -> LoadedManifest:
    """Read and validate a JSONL manifest.

    Args:
        path: The manifest file; relative `image` paths are resolved against its folder.
        check_images: Open and fully decode every image, so that a missing, unreadable
            or truncated file is reported here rather than during training.
        skip_invalid: Drop invalid records and return their problems instead of raising.

    Raises:
        ManifestError: The file is missing or empty, it has invalid records and
            `skip_invalid` is False, or no valid record is left.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(f"manifest not found: {path}") from None
    except OSError as err:
        raise ManifestError(f"cannot read manifest {path}: {err}") from None

    base = Path(os.path.abspath(path.parent))
    records: list[dict] = []
    problems: list[Problem] = []
    seen_ids: dict[str, int] = {}
    nonblank = 0
    for number, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        nonblank += 1
        record, line_problems = _check_line(raw, number, str(path), base, seen_ids, check_images)
        if line_problems:
            problems.extend(line_problems)
        else:
            records.append(record)

    if nonblank == 0:
        raise ManifestError(f"manifest {path} is empty: it has no records")
    if problems and not skip_invalid:
        raise ManifestError(
            f"{path} has invalid records; {_summary(problems)}\n"
            "Fix these lines, or skip the invalid records with `data.skip_invalid: true`"
            " (training) or `--skip-invalid` (pebr data validate)."
        )
    if not records:
        raise ManifestError(f"{path} has no valid records; {_summary(problems)}")
    return LoadedManifest(path=path, records=records, problems=problems)


def load_image(path: str | Path) -> Image.Image:
    """Open an image as RGB; an unreadable file raises ManifestError naming it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except _IMAGE_ERRORS as err:
        raise ManifestError(f"cannot read image {path}: {err}") from None


def _check_line(
    raw: bytes,
    number: int,
    path: str,
    base: Path,
    seen_ids: dict[str, int],
    check_images: bool,
) -> tuple[dict, list[Problem]]:
    """Parse and check one line; return the record (image resolved) and its problems."""

    def problem(field: str | None, message: str, sample_id: str | None = None) -> Problem:
        return Problem(path, number, field, message, sample_id)

    try:
        text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
    except UnicodeDecodeError as err:
        return {}, [problem(None, f"line is not valid UTF-8: {err}")]
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        return {}, [problem(None, f"malformed JSON: {err}")]
    if not isinstance(record, dict):
        return {}, [problem(None, f"expected a JSON object, got {_type_name(record)}")]

    sample_id = record.get("id") if isinstance(record.get("id"), str) and record["id"] else None
    found: list[Problem] = []
    for field in REQUIRED_FIELDS:
        if field not in record:
            found.append(problem(field, "required field is missing", sample_id))
    for field, (check, expected) in _FIELD_CHECKS.items():
        if field in record and not check(record[field]):
            got = "an empty string" if record[field] == "" else _type_name(record[field])
            found.append(problem(field, f"expected {expected}, got {got}", sample_id))

    if sample_id is not None:
        if sample_id in seen_ids:
            first = seen_ids[sample_id]
            found.append(problem("id", f"duplicate id, first used on line {first}", sample_id))
        else:
            seen_ids[sample_id] = number

    image = record.get("image")
    if isinstance(image, str) and image:
        resolved = os.path.normpath(base / image)  # an absolute `image` replaces `base`
        if check_images:
            message = _image_problem(resolved)
            if message is not None:
                found.append(problem("image", message, sample_id))
        record = {**record, "image": resolved}
    return record, found


def _image_problem(path: str) -> str | None:
    if not os.path.isfile(path):
        return f"image file not found: {path}"
    try:
        with Image.open(path) as image:
            image.load()
    except _IMAGE_ERRORS as err:
        return f"image unreadable or truncated: {path}: {err}"
    return None


def _summary(problems: list[Problem]) -> str:
    lines = len({p.line for p in problems})
    head = f"{len(problems)} problem(s) on {lines} line(s):"
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
