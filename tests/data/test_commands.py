"""`pebr data synth` and `pebr data validate`, called the way the top-level CLI calls them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pebr_lightning.data.commands import main
from pebr_lightning.errors import ManifestError


def test_synth_writes_images_and_manifest(tmp_path: Path, capsys) -> None:
    out = tmp_path / "shapes"
    assert main(["synth", "--out", str(out), "--n", "5", "--seed", "1"]) == 0
    manifest = out / "manifest.jsonl"
    assert capsys.readouterr().out == f"wrote 5 records to {manifest}\n"
    records = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in records] == [f"shapes-1-{i:06d}" for i in range(5)]
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:06d}.png" for i in range(5)]


def test_validate_a_good_manifest(dataset, capsys) -> None:
    manifest, _ = dataset
    assert main(["validate", str(manifest)]) == 0
    assert capsys.readouterr().out == f"{manifest}: 4 records OK\n"


def test_validate_a_bad_manifest_raises(dataset, tmp_path: Path) -> None:
    manifest, _ = dataset
    (tmp_path / "images" / "000001.png").unlink()
    with pytest.raises(ManifestError, match=r"manifest\.jsonl:2: field 'image'"):
        main(["validate", str(manifest)])


def test_validate_skip_invalid_reports_what_it_skipped(dataset, tmp_path: Path, capsys) -> None:
    manifest, _ = dataset
    (tmp_path / "images" / "000001.png").unlink()
    (tmp_path / "images" / "000003.png").write_bytes(b"not a png")
    assert main(["validate", str(manifest), "--skip-invalid"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{manifest}: 2 valid, 2 skipped"
    assert lines[1].startswith(f"  {manifest}:2: field 'image': image file not found")
    assert lines[2].startswith(f"  {manifest}:4: field 'image': image unreadable")
    assert len(lines) == 3


def test_validate_without_image_checks(dataset, tmp_path: Path, capsys) -> None:
    manifest, _ = dataset
    (tmp_path / "images" / "000001.png").unlink()
    assert main(["validate", str(manifest), "--no-check-images"]) == 0
    assert capsys.readouterr().out == f"{manifest}: 4 records OK\n"


def test_help_lists_both_subcommands(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: pebr data" in out and "synth" in out and "validate" in out


@pytest.mark.parametrize("argv", [[], ["synth"], ["synth", "--out", "x", "--n", "0"], ["nope"]])
def test_bad_arguments_exit_with_usage(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage: pebr data" in capsys.readouterr().err


def test_demo_writes_the_demo_configs_three_splits(tmp_path, capsys) -> None:
    """`--demo` writes what configs/demo/*.yaml read, with the schedule's seeds
    (split i: seed + i), so its files equal the ones the demo schedule writes."""
    from pebr_demo.data.synth import write_dataset

    assert main(["synth", "--demo", "--out", str(tmp_path / "demo"), "--n", "3"]) == 0
    for offset, split in enumerate(("train", "val", "test")):
        written = tmp_path / "demo" / split / "manifest.jsonl"
        assert len(written.read_text().splitlines()) == 3
        same = write_dataset(tmp_path / "ref" / split, n=3, seed=offset)
        assert written.read_text() == same.read_text()
    assert "wrote 3 records to" in capsys.readouterr().out


def test_a_missing_demo_manifest_says_how_to_make_it(tmp_path, monkeypatch, capsys) -> None:
    from pebr_lightning.cli import main as pebr

    monkeypatch.chdir(tmp_path)
    sft = Path(__file__).resolve().parents[2] / "configs" / "demo" / "sft.yaml"
    assert pebr(["fit", "--config", str(sft)]) == 2
    err = capsys.readouterr().err
    assert "manifest not found: data/demo/train/manifest.jsonl" in err
    assert "`pebr data synth --demo`" in err
