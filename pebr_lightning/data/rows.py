"""Reading a manifest's records from its source, before any check.

A manifest is a JSONL file (one record per line), a `.json` array of records, or a
table (Parquet, a saved Hugging Face dataset, a hub id; tables.py). Each reader
yields `(number, record, problems found while reading)` with our field names already
applied (`field_map`), so that manifest.py checks every source's records alike. A
record of {} with a problem of field None stands for a line that is not a record.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

from pebr_lightning.data import tables
from pebr_lightning.errors import ManifestError

# Each yields (number, record, problems found before the record checks); a record
# of {} with a problem of field None stands for a line that is not a record at all.
Rows = Iterable[tuple[int, dict, list[tuple[str | None, str]]]]


def jsonl_records(path: Path, field_map: dict[str, str]) -> Rows:
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
            yield number, apply_field_map(record, field_map), []


def json_array_records(path: Path, field_map: dict[str, str]) -> Rows:
    """A `.json` file holding one array of records, as LLaMA-Factory's data files do."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except FileNotFoundError:
        raise tables.manifest_not_found(path) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ManifestError(f"cannot read {path} as one JSON array of records: {err}") from None
    if not isinstance(data, list):
        raise ManifestError(
            f"{path}: expected a JSON array of records, got {type_name(data)} "
            "(one record per line is a .jsonl manifest)"
        )
    for number, record in enumerate(data, start=1):
        if isinstance(record, dict):
            yield number, apply_field_map(record, field_map), []
        else:
            yield number, {}, [(None, f"expected a JSON object, got {type_name(record)}")]


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
        return {}, f"expected a JSON object, got {type_name(record)}"
    return record, None


def table_records(
    source: tables.TableSource,
    field_map: dict[str, str],
    image_dir: str | Path | None,
    *,
    required: tuple[str, ...],
    our_fields: frozenset[str],
) -> Rows:
    """A table's rows as records: `required` are the fields every record needs (a
    column missing for one of them is one problem, not one per row); `our_fields` are
    the fields the manifest checks, whose null cells mean absent."""
    path = source.spec
    opened = tables.open_table(source)
    schema = tables.table_schema(opened)
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
    lacking = [name for name in required if name not in columns and name not in mapped]
    if "images" in columns or "images" in mapped:  # several images per row: `images` is theirs
        lacking = [name for name in lacking if name != "image"]
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
    binary = tables.binary_columns(schema) - {
        field_map.get("image", "image"),
        field_map.get("images", "images"),
    }
    image_dir = Path(image_dir) if image_dir is not None else tables.default_image_dir()
    for number, row in enumerate(tables.iter_rows(opened), start=1):
        row = {k: v for k, v in row.items() if k not in binary}
        record = apply_field_map(row, field_map)
        if number_ids:
            record["id"] = f"{source.stem}-{number}"
        record, known = _table_record(record, image_dir, source.base, our_fields)
        # Name the column too where it differs, since that is what the user looks at.
        known = [
            (name, f"{message} (column '{field_map[name]}')" if name in field_map else message)
            for name, message in known
        ]
        yield number, record, known


def _table_record(
    record: dict, image_dir: Path, base: Path, our_fields: frozenset[str]
) -> tuple[dict, list[tuple[str | None, str]]]:
    """Make a table row look like a JSONL record: image as a path, answer as text."""
    # A column exists in every row, so a null in one of our fields means "absent".
    record = {k: v for k, v in record.items() if not (v is None and k in our_fields)}
    known: list[tuple[str | None, str]] = []
    if isinstance(record.get("id"), int) and not isinstance(record["id"], bool):
        record["id"] = str(record["id"])  # integer ids (`pid` columns) are common
    answer = record.get("answer")
    if isinstance(answer, int | float) and not isinstance(answer, bool):
        if isinstance(answer, float) and not math.isfinite(answer):
            known.append(("answer", f"expected a string or a finite number, got {answer}"))
        else:
            record["answer"] = _number_text(answer)
    if isinstance(record.get("image"), list) and len(record["image"]) > 1:
        record["images"] = record.pop("image")  # a list column of several: the record's images
    if "image" in record:
        try:
            record["image"] = tables.extract_image(record["image"], image_dir=image_dir, base=base)
        except tables.ImageValueError as err:
            known.append(("image", str(err)))
    elif "images" in record:
        cells = record["images"]
        try:
            record["images"] = [
                tables.extract_image(cell, image_dir=image_dir, base=base)
                for cell in (cells if isinstance(cells, list) else [cells])
            ]
        except tables.ImageValueError as err:
            known.append(("images", str(err)))
    return record, known


def _number_text(number: int | float) -> str:
    # Float columns often hold whole numbers (an int column with gaps); 3.0 means "3".
    if isinstance(number, float) and number.is_integer():
        return str(int(number))
    return str(number)


def apply_field_map(record: dict, field_map: dict[str, str]) -> dict:
    """Rename the source's fields to ours; a mapped field replaces one of the same name."""
    if not field_map:
        return record
    theirs = set(field_map.values())
    renamed = {k: v for k, v in record.items() if k not in theirs}
    for ours, name in field_map.items():
        if name in record:
            renamed[ours] = record[name]
    return renamed


def type_name(value: object) -> str:
    names = {dict: "object", list: "list", str: "str", bool: "bool", type(None): "null"}
    return names.get(type(value), type(value).__name__)
