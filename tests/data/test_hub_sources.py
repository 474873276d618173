"""Manifests named the way `datasets` users name data: a hub id (`owner/name@split`),
a saved DatasetDict (`folder@split`), a hub-layout folder of Parquet or JSON files.

The hub is switched off (HF_HUB_OFFLINE=1, tests/conftest.py): a hub id resolves to a
folder laid out as a hub dataset repository under the working directory, the way
`datasets.load_dataset` resolves it, and an id that is not there fails with its name.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
from pathlib import Path

import datasets
import pytest
import yaml
from PIL import Image

from pebr_demo.data.synth import write_dataset
from pebr_lightning.cli import main
from pebr_lightning.data.manifest import load_manifest
from pebr_lightning.errors import ManifestError

REPO = Path(__file__).resolve().parents[2]
CARD = (
    "---\nlicense: cc-by-4.0\npretty_name: Shapes (test copy)\n---\n# Shapes\nA tiny test copy.\n"
)


def _records(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text().splitlines()]


def _rows(manifest: Path) -> list[dict]:
    """The synthetic records as a public dataset ships them: the image bytes inside."""
    return [
        {
            **record,
            "image": {"bytes": (manifest.parent / record["image"]).read_bytes(), "path": None},
        }
        for record in _records(manifest)
    ]


def _tables(*manifests: Path) -> list[datasets.Dataset]:
    """One table per manifest, all with one schema (every column in every row, null
    where a record lacks it), as the splits of a hub dataset have."""
    parts = [_rows(m) for m in manifests]
    columns = list(dict.fromkeys(key for rows in parts for row in rows for key in row))
    whole = datasets.Dataset.from_list(
        [{key: row.get(key) for key in columns} for rows in parts for row in rows]
    ).cast_column("image", datasets.Image())
    out, start = [], 0
    for rows in parts:
        out.append(whole.select(range(start, start + len(rows))).flatten_indices())
        start += len(rows)
    return out


def _as_table(manifest: Path) -> datasets.Dataset:
    return _tables(manifest)[0]


def _dataset_dict(splits: dict[str, Path]) -> datasets.DatasetDict:
    return datasets.DatasetDict(zip(splits, _tables(*splits.values()), strict=True))


@pytest.fixture
def splits(tmp_path: Path) -> dict[str, Path]:
    return {
        "train": write_dataset(tmp_path / "src" / "train", n=8, seed=0),
        "validation": write_dataset(tmp_path / "src" / "val", n=4, seed=1),
    }


def hub_repo(root: Path, splits: dict[str, Path], kind: str = "parquet") -> Path:
    """root/acme/shapes laid out as a hub dataset repository: a card and one data file
    per split (Parquet with the image bytes inside, or JSON Lines with image files)."""
    repo = root / "acme" / "shapes"
    (repo / "data").mkdir(parents=True)
    (repo / "README.md").write_text(CARD)
    tables = _dataset_dict(splits)
    for split, manifest in splits.items():
        if kind == "parquet":
            tables[split].to_parquet(str(repo / "data" / f"{split}-00000-of-00001.parquet"))
        else:
            # Image files beside the data, named by relative path; every key in every row.
            shutil.copytree(manifest.parent / "images", repo / "images" / split)
            columns = tables[split].column_names
            lines = [
                json.dumps(
                    {key: record.get(key) for key in columns}
                    | {"image": record["image"].replace("images/", f"images/{split}/")}
                )
                for record in _records(manifest)
            ]
            (repo / "data" / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    if kind == "json":
        # JSON carries no types: the card declares them, as hub JSON datasets do (else
        # a column null in one split and filled in another cannot be read).
        features = tables["train"].features.copy()
        features["image"] = datasets.Value("string")
        # It names the data files too: the folder holds more image files than data
        # files, and `datasets` would otherwise read it as an image folder.
        info = datasets.DatasetInfo(features=features)._to_yaml_dict()
        files = [{"split": split, "path": f"data/{split}.jsonl"} for split in splits]
        configs = [{"config_name": "default", "data_files": files}]
        header = yaml.safe_dump({"configs": configs, "dataset_info": info})
        card = f"---\n{header}---\n# Shapes\n"
        (repo / "README.md").write_text(card)
    return repo


def _pixels(path: str) -> bytes:
    with Image.open(path) as image:
        return image.convert("RGB").tobytes()


def _same_records(loaded: list[dict], manifest: Path) -> None:
    """Every field as in the JSONL manifest; the image the same pixels."""
    originals = _records(manifest)
    assert [r["id"] for r in loaded] == [r["id"] for r in originals]
    for got, want in zip(loaded, originals, strict=True):
        assert {k: v for k, v in got.items() if k != "image"} == {
            k: v for k, v in want.items() if k != "image"
        }
        assert _pixels(got["image"]) == _pixels(str(manifest.parent / want["image"]))


@pytest.mark.parametrize("kind", ["parquet", "json"])
def test_a_hub_layout_folder_loads_by_name_with_the_hub_off(tmp_path, monkeypatch, splits, kind):
    hub_repo(tmp_path / "hub", splits, kind)
    monkeypatch.chdir(tmp_path / "hub")
    _same_records(load_manifest("acme/shapes@validation").records, splits["validation"])
    _same_records(load_manifest("acme/shapes").records, splits["train"])  # default: train
    with_config = load_manifest("acme/shapes:default@validation").records
    _same_records(with_config, splits["validation"])
    with pytest.raises(ManifestError, match=r"^acme/shapes@test: no split 'test'; its splits"):
        load_manifest("acme/shapes@test")


def test_a_hub_id_that_is_not_there_names_itself(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ManifestError, match=r"^cannot read hub dataset acme/missing@train: "):
        load_manifest("acme/missing@train")


def test_a_saved_dataset_dict_loads_by_split(tmp_path, splits):
    saved = _dataset_dict(splits)
    saved.save_to_disk(str(tmp_path / "saved"))
    _same_records(load_manifest(f"{tmp_path / 'saved'}@validation").records, splits["validation"])
    # Without a train split, an unnamed split is an error that lists them.
    table = _as_table(splits["train"])
    datasets.DatasetDict({"a": table, "b": table}).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(ManifestError) as info:
        load_manifest(tmp_path / "two")
    assert (
        str(info.value)
        == f"{tmp_path / 'two'} has splits a, b: name one, e.g. {tmp_path / 'two'}@a"
    )


def test_a_bad_row_of_a_hub_dataset_names_source_row_and_field(tmp_path, monkeypatch, splits):
    rows = _as_table(splits["train"]).to_list()
    rows[1]["answer"] = None
    repo = tmp_path / "acme" / "broken" / "data"
    repo.mkdir(parents=True)
    table = datasets.Dataset.from_list(rows).cast_column("image", datasets.Image())
    table.to_parquet(str(repo / "train-00000-of-00001.parquet"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ManifestError) as info:
        load_manifest("acme/broken@train")
    assert (
        f"acme/broken@train:row 2: field 'answer': required field is missing (id {rows[1]['id']})"
        in str(info.value)
    )


def test_images_are_not_decoded_while_loading(tmp_path, splits):
    """A PNG cut short keeps a readable header: loading without `check_images` writes
    it out undecoded; with it, the one decode names the row."""
    rows = _as_table(splits["train"]).cast_column("image", datasets.Image(decode=False)).to_list()
    whole = rows[2]["image"]["bytes"]
    rows[2]["image"] = {"bytes": whole[: len(whole) // 2], "path": None}
    parquet = tmp_path / "cut.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    lazy = load_manifest(parquet, check_images=False, image_dir=tmp_path / "images")
    assert len(lazy.records) == 8
    with pytest.raises(OSError):  # the decode the data loader would do, per batch
        Image.open(lazy.records[2]["image"]).load()
    with pytest.raises(ManifestError, match=r"cut\.parquet:row 3: field 'image': "):
        load_manifest(parquet, image_dir=tmp_path / "images")
    assert Image.open(io.BytesIO(whole)).size == (112, 112)


def _fit(config: str, manifest: str, out: Path, *extra: str) -> int:
    return main(
        [
            "fit",
            "--config",
            str(REPO / "configs" / "demo" / config),
            "--data.init_args.train_manifest",
            manifest,
            "--data.init_args.val_manifest",
            "null",
            "--data.init_args.batch_size",
            "2",
            "--data.init_args.num_workers",
            "0",
            "--trainer.max_steps",
            "2",
            "--trainer.log_every_n_steps",
            "1",
            "--trainer.default_root_dir",
            str(out),
            *extra,
        ]
    )


@pytest.mark.parametrize("source", ["hub id", "saved DatasetDict", "Parquet file"])
def test_pebr_fit_trains_sft_and_grpo_from_a_named_dataset(tmp_path, monkeypatch, splits, source):
    if source == "hub id":
        hub_repo(tmp_path, splits)
        manifest = "acme/shapes@train"
    elif source == "saved DatasetDict":
        _dataset_dict(splits).save_to_disk(str(tmp_path / "saved"))
        manifest = "saved@train"
    else:
        _dataset_dict(splits)["train"].to_parquet(str(tmp_path / "train.parquet"))
        manifest = "train.parquet"
    monkeypatch.chdir(tmp_path)
    assert _fit("sft.yaml", manifest, tmp_path / "sft") == 0
    grpo = (
        "--model.init_args.sampling.group_size",
        "2",
        "--model.init_args.sampling.max_new_tokens",
        "8",
    )
    assert _fit("perception.yaml", manifest, tmp_path / "grpo", *grpo) == 0
    for run in ("sft", "grpo"):
        (metrics,) = (tmp_path / run).rglob("metrics.csv")
        rows = list(csv.DictReader(metrics.open()))
        logged = [
            float(r[key]) for r in rows for key in ("train/loss", "reward/total/mean") if r.get(key)
        ]
        assert logged and all(math.isfinite(v) for v in logged), run
        assert list((tmp_path / run).rglob("last.hf/model.safetensors")), run
