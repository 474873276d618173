"""Greedy evaluation on the tiny model: files, grading, determinism, batch invariance, CLI.

The embedded tiny model has near-zero random weights and answers every question with
the same run of newlines, which would make determinism and batch-size checks pass
vacuously. Most tests therefore use `noisy_model`: the same checkpoint with its
matrices redrawn at std 0.1 (seed 0), which gives a different answer per question.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pebr_demo.evaluation.perception import perception_scores
from pebr_lightning.cli import main as pebr_main
from pebr_lightning.data.manifest import load_manifest
from pebr_lightning.evaluation import evaluate
from pebr_lightning.evaluation import greedy as greedy_module
from pebr_lightning.rewards.accuracy import AccuracyReward

MAX_NEW_TOKENS = 24


@pytest.fixture(scope="module")
def noisy_model(tiny_path, tmp_path_factory) -> Path:
    from transformers import AutoModelForImageTextToText

    from pebr_lightning.models.policy import load_processor

    model = AutoModelForImageTextToText.from_pretrained(tiny_path, local_files_only=True)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    folder = tmp_path_factory.mktemp("noisy-tiny")
    model.save_pretrained(folder)
    load_processor(str(tiny_path)).save_pretrained(folder)
    return folder


def run(model, manifest, out, **kwargs) -> tuple[dict, list[dict], dict]:
    kwargs.setdefault("max_new_tokens", MAX_NEW_TOKENS)
    values = evaluate(str(model), manifest, out, progress=False, **kwargs)
    rows = [json.loads(line) for line in (Path(out) / "predictions.jsonl").read_text().splitlines()]
    return values, rows, json.loads((Path(out) / "metrics.json").read_text())


def write_manifest(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_evaluate_writes_predictions_and_matching_metrics(noisy_model, shapes_data, tmp_path):
    manifest = shapes_data["val"]
    records = load_manifest(manifest).records
    values, rows, saved = run(noisy_model, manifest, tmp_path / "out", batch_size=4)
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    assert [r["type"] for r in rows] == [r["type"] for r in records]
    assert [r["answer"] for r in rows] == [r["answer"] for r in records]
    assert len({r["prediction"] for r in rows}) > 1  # a real spread of answers
    mean = sum(r["correct"] for r in rows) / len(rows)
    assert saved["accuracy"] == pytest.approx(mean) and values["accuracy"] == saved["accuracy"]
    assert saved["n"] == len(records) and saved["ungraded"] == 0
    for name in {r["type"] for r in records}:
        mine = [r["correct"] for r in rows if r["type"] == name]
        assert saved[f"n/{name}"] == len(mine)
        assert saved[f"accuracy/{name}"] == pytest.approx(sum(mine) / len(mine))
    # Accuracy split by whether the greedy description names the right shapes.
    scores = [
        perception_scores(r["prediction"], x["shapes"]) for r, x in zip(rows, records, strict=True)
    ]
    right = [score["shapes"] for score in scores]
    assert saved["perception/shapes"] == pytest.approx(sum(right) / len(rows))
    assert (saved["perception/desc_right_n"], saved["perception/desc_wrong_n"]) == (
        sum(right),
        len(rows) - sum(right),
    )
    for side, wanted in (("desc_right", True), ("desc_wrong", False)):
        mine = [r["correct"] for r, ok in zip(rows, right, strict=True) if ok == wanted]
        if mine:
            assert saved[f"accuracy/{side}"] == pytest.approx(sum(mine) / len(mine))
        else:
            assert f"accuracy/{side}" not in saved
    assert saved["model"] == str(noisy_model) and saved["manifest"] == str(manifest)
    assert saved["seconds"] > 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "metrics.json",
        "predictions.jsonl",
    ]


def test_grading_counts_right_wrong_ungraded_and_untyped(noisy_model, shapes_data, tmp_path):
    """Records 0-2 get the model's own final answer as reference (where the reward
    accepts it as equal to itself): right. Record 3 gets an empty answer: ungraded,
    counted wrong. Records 4-5 lose their `type`: type "all". Prompts do not contain
    the answer, so greedy predictions are those of a first run on the unchanged data."""
    records = load_manifest(shapes_data["val"]).records
    _, first, _ = run(noisy_model, shapes_data["val"], tmp_path / "first", batch_size=8)
    reward = AccuracyReward()
    changed = []
    for i, row in enumerate(first):
        if len(changed) == 3:
            break
        answer = row["extracted"].strip()
        if answer and reward(completions=[row["prediction"]], samples=[{"answer": answer}]) == [
            1.0
        ]:
            records[i] = {**records[i], "answer": answer}
            records[i].pop("choices", None)
            changed.append(i)
    assert len(changed) == 3
    blank = next(i for i in range(len(records)) if i not in changed)
    records[blank] = {**records[blank], "answer": ""}
    untyped = [i for i in range(len(records)) if i not in changed and i != blank][:2]
    for i in untyped:
        records[i] = {k: v for k, v in records[i].items() if k != "type"}
    manifest = write_manifest(tmp_path / "changed.jsonl", records)

    values, rows, saved = run(noisy_model, manifest, tmp_path / "out", batch_size=8)
    assert [r["prediction"] for r in rows] == [r["prediction"] for r in first]
    right = {i for i, r in enumerate(first) if r["correct"] and i != blank} | set(changed)
    assert {i for i, r in enumerate(rows) if r["correct"]} == right
    assert [i for i, r in enumerate(rows) if not r["graded"]] == [blank]
    assert values["ungraded"] == 1 and saved["ungraded"] == 1
    assert values["accuracy"] == pytest.approx(len(right) / len(records))
    assert [rows[i]["type"] for i in untyped] == ["all", "all"] and values["n/all"] == 2


def test_greedy_decoding_is_deterministic(noisy_model, shapes_data, tmp_path):
    _, once, _ = run(noisy_model, shapes_data["val"], tmp_path / "a", limit=8)
    _, again, _ = run(noisy_model, shapes_data["val"], tmp_path / "b", limit=8)
    assert [r["prediction"] for r in once] == [r["prediction"] for r in again]
    assert len({r["prediction"] for r in once}) > 1


def test_batch_size_does_not_change_greedy_answers(noisy_model, shapes_data, tmp_path):
    """One question made ~30 tokens longer, so its batch-mates carry that much left
    padding: batches of 4 must decode exactly what batches of 1 do."""
    records = load_manifest(shapes_data["val"]).records[:8]
    records[2] = {**records[2], "question": records[2]["question"] + " Look again." * 10}
    manifest = write_manifest(tmp_path / "padded.jsonl", records)
    _, single, _ = run(noisy_model, manifest, tmp_path / "one", batch_size=1)
    _, batched, _ = run(noisy_model, manifest, tmp_path / "four", batch_size=4)
    assert [r["prediction"] for r in batched] == [r["prediction"] for r in single]
    assert len({r["prediction"] for r in single}) > 1


def test_a_failed_run_leaves_earlier_files_whole(noisy_model, shapes_data, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run(noisy_model, shapes_data["val"], out, limit=2)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def crash(*args, **kwargs):
        raise RuntimeError("decoding failed")

    monkeypatch.setattr(greedy_module, "greedy_answers", crash)
    with pytest.raises(RuntimeError, match="decoding failed"):
        evaluate(str(noisy_model), shapes_data["val"], out, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_pebr_eval_command(tiny_path, shapes_data, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["eval", "--model", str(tiny_path), "--manifest", str(shapes_data["val"])]
    argv += ["--out", str(out), "--limit", "6", "--max-new-tokens", "8", "--no-progress"]
    assert pebr_main(argv) == 0
    printed = capsys.readouterr().out
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["n"] == 6
    overall = next(line for line in printed.splitlines() if line.startswith("overall"))
    assert overall.split()[1:3] == ["6", f"{saved['accuracy']:.4f}"]
    for name in {k.split("/", 1)[1] for k in saved if k.startswith("n/")}:
        row = [name, str(int(saved[f"n/{name}"])), f"{saved[f'accuracy/{name}']:.4f}"]
        assert row in [line.split() for line in printed.splitlines()]
    # The tiny model writes no description: every one is wrong, and accuracy given a
    # wrong description is the whole accuracy, over all 6 records.
    assert saved["perception/shapes"] == 0.0 and "accuracy/desc_right" not in saved
    row = ["accuracy/desc_wrong", "6", f"{saved['accuracy']:.4f}"]
    assert row in [line.split() for line in printed.splitlines()]
    assert not any(line.startswith("perception/shapes/") for line in printed.splitlines())


def test_pebr_eval_missing_manifest_exits_2(tiny_path, tmp_path, capsys):
    argv = ["eval", "--model", str(tiny_path), "--manifest", str(tmp_path / "nope.jsonl")]
    assert pebr_main([*argv, "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "error: manifest not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_sampled_accuracy_and_pass_at_k(noisy_model, shapes_data, tmp_path):
    """Half the records get the model's own greedy answer as reference. At temperature
    0 every sample is the greedy answer, so sampled accuracy and pass@k equal greedy
    accuracy; at temperature 1 pass@k is at least the sampled accuracy, both are
    shares of the k x n graded answers, and the same seed draws the same answers."""
    records = load_manifest(shapes_data["val"]).records[:8]
    _, first, _ = run(noisy_model, write_manifest(tmp_path / "a.jsonl", records), tmp_path / "a")
    reward = AccuracyReward()
    for record, row in list(zip(records, first, strict=True))[:4]:
        if reward(completions=[row["prediction"]], samples=[{"answer": row["extracted"]}]) == [1.0]:
            record["answer"] = row["extracted"]
    manifest = write_manifest(tmp_path / "b.jsonl", records)
    greedy, _, _ = run(noisy_model, manifest, tmp_path / "b", samples=3, temperature=0.0)
    assert greedy["accuracy"] > 0
    assert greedy["sampled_accuracy"] == pytest.approx(greedy["accuracy"])
    assert greedy["pass@3"] == pytest.approx(greedy["accuracy"])

    sampled, _, saved = run(noisy_model, manifest, tmp_path / "c", samples=4, temperature=1.0)
    assert 0 <= sampled["sampled_accuracy"] <= sampled["pass@4"] <= 1
    assert (sampled["sampled_accuracy"] * 4 * len(records)).is_integer()
    assert saved["pass@4"] == sampled["pass@4"]
    again, _, _ = run(noisy_model, manifest, tmp_path / "d", samples=4, temperature=1.0)
    assert again["sampled_accuracy"] == sampled["sampled_accuracy"]
