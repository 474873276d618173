"""`pebr sample` on the tiny model: splits written, a killed run resumed, settings guarded."""

from __future__ import annotations

import json

import pytest

from pebr_lightning.cli import main
from pebr_lightning.data.manifest import load_manifest
from pebr_lightning.difficulty.sampler import SampleSettings, sample_difficulty
from pebr_lightning.errors import PebrError


def settings(tiny_path, shapes_data, **changes) -> SampleSettings:
    values = dict(
        model=str(tiny_path),
        manifest=str(shapes_data["train"]),
        k=2,
        max_new_tokens=6,
        limit=6,
    )
    return SampleSettings(**{**values, **changes})


def split_ids(out) -> dict[str, list[str]]:
    return {
        name: [json.loads(line)["id"] for line in (out / f"{name}.jsonl").read_text().splitlines()]
        for name in ("easy", "medium", "hard")
    }


def test_killed_run_resumes_without_redoing_or_duplicating(tiny_path, shapes_data, tmp_path):
    """A run is cut after its second progress line, half-way through writing the third
    (what kill -9 during a write leaves). The resumed run drops the half line, keeps the
    finished lines as they are (the first is edited to 2/2 correct to tell) and grades
    the rest: every question once, in the split its line says."""
    out = tmp_path / "sample"
    first = sample_difficulty(settings(tiny_path, shapes_data), out, batch_size=2, progress=False)
    assert first["questions"] == 6 and sum(first["counts"].values()) == 6
    log = out / "rollouts.jsonl"
    lines = log.read_text().splitlines()
    assert len(lines) == 6
    marked = {**json.loads(lines[0]), "correct": 2}
    log.write_text(json.dumps(marked) + "\n" + lines[1] + "\n" + lines[2][:10])

    again = sample_difficulty(settings(tiny_path, shapes_data), out, batch_size=2, progress=False)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    ids = [r["id"] for r in rows]
    assert sorted(ids) == sorted(r["id"] for r in load_manifest(shapes_data["train"]).records[:6])
    assert rows[0] == marked and len(set(ids)) == 6
    assert again["questions"] == 6 and sum(again["histogram"]) == 6
    assert marked["id"] in split_ids(out)["easy"]  # 2 of k = 2 correct
    for row in rows:
        label = "easy" if row["correct"] == 2 else "hard" if row["correct"] == 0 else "medium"
        assert row["id"] in split_ids(out)[label]
    # The split manifests are manifests: they load, with the original fields.
    easy = load_manifest(out / "easy.jsonl").records
    assert easy[0]["question"] and easy[0]["answer"]


def test_other_settings_do_not_continue_a_run(tiny_path, shapes_data, tmp_path):
    out = tmp_path / "sample"
    sample_difficulty(settings(tiny_path, shapes_data, limit=2), out, progress=False)
    with pytest.raises(PebrError, match=r"other settings \(k: 2 -> 3\)"):
        sample_difficulty(settings(tiny_path, shapes_data, limit=2, k=3), out, progress=False)


def test_command_prints_the_summary(tiny_path, shapes_data, tmp_path, capsys):
    code = main(
        [
            "sample",
            "--model",
            str(tiny_path),
            "--manifest",
            str(shapes_data["train"]),
            "--out",
            str(tmp_path / "s"),
            "--k",
            "2",
            "--max-new-tokens",
            "4",
            "--limit",
            "3",
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert printed.startswith("3 questions, k = 2")
    assert f"hard   {summary['counts']['hard']:>6}" in printed
