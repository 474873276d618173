"""Question records with several images (`images`): validated, prompted with one image
part each, rolled out and scored with each prompt's own images, trained by SFT and
GRPO, and answered by `pebr eval` and `pebr sample`. Real tiny model and processor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pebr_lightning.cli import main
from pebr_lightning.data.collate import PromptCollator, RecordDataset
from pebr_lightning.data.manifest import load_manifest
from pebr_lightning.data.prompts import PromptConfig, build_messages
from pebr_lightning.engines.hf import sample_group
from pebr_lightning.errors import ManifestError
from pebr_lightning.models.families.qwen_vl import QwenVL
from pebr_lightning.models.policy import build_policy, unwrap
from pebr_lightning.models.rollout import (
    SamplingConfig,
    all_features,
    completion_logprobs,
    eos_token_ids,
)

REPO = Path(__file__).resolve().parents[2]


def two_image_manifest(shapes_manifest: Path, out: Path, counts=(1, 2, 3, 2, 1, 2)) -> Path:
    """Records of 1-3 images each from the synthetic set (the images of the next
    records joined to the first's question and answer); paths relative to `out`."""
    records = [json.loads(line) for line in shapes_manifest.read_text().splitlines()]
    folder = shapes_manifest.parent
    lines = []
    for i, count in enumerate(counts):
        first = records[i]
        paths = [str(folder / records[(i + k) % len(records)]["image"]) for k in range(count)]
        record = {k: v for k, v in first.items() if k != "image"}
        record["id"] = f"multi-{i}"
        record["images"] = paths
        if count == 2:  # placeholders: each image where its mark is
            record["question"] = f"Look at <image> and <image>. {first['question']}"
        lines.append(json.dumps(record))
    manifest = out / "multi.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


@pytest.fixture
def multi(tmp_path, shapes_data) -> Path:
    return two_image_manifest(shapes_data["train"], tmp_path / "multi")


def test_records_of_several_images_load_with_each_path_resolved(multi):
    records = load_manifest(multi).records
    assert [len(r["images"]) for r in records] == [1, 2, 3, 2, 1, 2]
    assert all(Path(p).is_absolute() and Path(p).is_file() for r in records for p in r["images"])
    assert all("image" not in r for r in records)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"image": "a.png"}, "field 'images': give `image` or `images`, not both"),
        ({"images": []}, "field 'images': expected a non-empty list of image paths"),
        ({"images": ["missing.png"]}, "field 'images[0]': image file not found"),
        (
            {"question": "<image> <image> <image>?"},
            "field 'question': the question holds 3 <image> placeholder(s) for 2 images",
        ),
    ],
)
def test_bad_image_lists_name_line_and_field(multi, change, message):
    lines = multi.read_text().splitlines()
    record = {**json.loads(lines[1]), **change}
    lines[1] = json.dumps(record)
    multi.write_text("\n".join(lines) + "\n")
    with pytest.raises(ManifestError) as info:
        load_manifest(multi)
    assert f"{multi}:2: {message}" in str(info.value)


def test_each_image_gets_its_part_and_its_tokens_in_order(multi, tiny_path):
    built = build_policy(str(tiny_path))
    records = load_manifest(multi).records
    placed = build_messages(records[1], PromptConfig())[0]["content"]
    assert [p["type"] for p in placed] == ["text", "image", "text", "image", "text"]
    first = build_messages(records[2], PromptConfig())[0]["content"]
    assert [p["type"] for p in first] == ["image", "image", "image", "text"]
    items = [RecordDataset(records)[i] for i in range(3)]
    batch = PromptCollator(built.processor, PromptConfig())(items)
    assert batch["image_counts"].tolist() == [1, 2, 3]
    assert batch["image_grid_thw"].shape[0] == 6
    pad = built.model.config.image_token_id
    per_image = int(batch["image_grid_thw"][0].prod()) // 4  # 2x2 merge
    assert (batch["input_ids"] == pad).sum(-1).tolist() == [per_image, 2 * per_image, 3 * per_image]
    assert [len(images) for images in batch["image_lists"]] == [1, 2, 3]


def test_rollout_logprobs_equal_a_plain_forward_of_each_prompt_alone(multi, tiny_path):
    """Prompts of 1, 2 and 3 images in one batch: the shared-prompt log-probs (with the
    features of every image computed once) equal the full forward, and each row
    equals the same completion scored with its prompt alone in a batch of one, where
    every image of the batch is that prompt's."""
    built = build_policy(str(tiny_path), freeze_vision=False)
    model, processor = built.model.eval(), built.processor
    base = unwrap(model)
    items = [RecordDataset(load_manifest(multi).records)[i] for i in range(3)]
    collate = PromptCollator(processor, PromptConfig())
    batch = collate(items)
    tok = processor.tokenizer
    sampling = SamplingConfig(group_size=2, max_new_tokens=8, temperature=1.0)
    with torch.no_grad():
        features = all_features(base, batch)
        rollout = sample_group(
            model, base, batch, sampling, eos_token_ids(tok, QwenVL.end_tokens), tok.pad_token_id,
            features=features, generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        rows = torch.arange(rollout.completion_ids.shape[0])
        shared = completion_logprobs(base, batch, rollout, rows, features, 1.0, share_prompt=True)
        full = completion_logprobs(base, batch, rollout, rows, None, 1.0)
    mask = rollout.completion_mask.bool()
    torch.testing.assert_close(shared[mask], full[mask], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(shared[mask], rollout.logprobs[mask], atol=2e-5, rtol=1e-4)
    for i in range(3):
        alone = collate([items[i]])
        for row in (2 * i, 2 * i + 1):
            with torch.no_grad():
                got = plain_logprobs(base, processor, alone, rollout.completion_ids[row])
            n = int(mask[row].sum())
            torch.testing.assert_close(got[:n], full[row, :n], atol=2e-5, rtol=1e-4)


def plain_logprobs(base, processor, prompt, completion):
    """Log-probs of `completion` [T] after the one prompt of `prompt`, from one plain
    forward of the whole sequence with the processor's own image inputs: nothing of
    models/rollout.py in the way."""
    real = prompt["attention_mask"][0].bool()
    ids = torch.cat([prompt["input_ids"][0][real], completion])[None]  # [1, P+T]
    types = torch.tensor(processor.create_mm_token_type_ids(ids.tolist()))
    hidden = base.model(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        mm_token_type_ids=types,
        pixel_values=prompt["pixel_values"],
        image_grid_thw=prompt["image_grid_thw"],
    ).last_hidden_state[0]  # [P+T, H]
    p = int(real.sum())
    logits = base.lm_head(hidden[p - 1 : -1])  # [T, V]: each position predicts the next
    return torch.log_softmax(logits.float(), -1).gather(-1, completion[:, None])[:, 0]


def _fit(config: str, manifest: Path, out: Path, *extra: str) -> int:
    return main(
        [
            "fit", "--config", str(REPO / "configs" / "demo" / config),
            "--data.init_args.train_manifest", str(manifest),
            "--data.init_args.val_manifest", "null",
            "--data.init_args.batch_size", "3", "--data.init_args.num_workers", "0",
            "--trainer.max_steps", "2", "--trainer.log_every_n_steps", "1",
            "--trainer.default_root_dir", str(out), *extra,
        ]
    )  # fmt: skip


def test_pebr_fit_trains_sft_and_grpo_on_records_of_several_images(multi, tmp_path):
    assert _fit("sft.yaml", multi, tmp_path / "sft") == 0
    grpo = (
        "--model.init_args.sampling.group_size=2",
        "--model.init_args.sampling.max_new_tokens=8",
        "--model.init_args.update.micro_batch_size=2",  # micro-batches cut between images
    )
    assert _fit("perception.yaml", multi, tmp_path / "grpo", *grpo) == 0
    for run, key in (("sft", "train/loss"), ("grpo", "reward/total/mean")):
        (metrics,) = (tmp_path / run).rglob("metrics.csv")
        header, *rows = [line.split(",") for line in metrics.read_text().splitlines()]
        values = [float(r[header.index(key)]) for r in rows if r[header.index(key)]]
        assert len(values) == 2 and all(v == v for v in values), (run, values)


def test_pebr_eval_and_sample_answer_records_of_several_images(multi, tmp_path, tiny_path):
    common = ["--model", str(tiny_path), "--manifest", str(multi), "--max-new-tokens", "8"]
    assert main(["eval", *common, "--out", str(tmp_path / "eval"), "--no-progress"]) == 0
    rows = [
        json.loads(x) for x in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()
    ]
    assert [r["id"] for r in rows] == [f"multi-{i}" for i in range(6)]
    sample = ["sample", *common, "--out", str(tmp_path / "sample"), "--k", "2", "--no-progress"]
    assert main(sample) == 0
    graded = (tmp_path / "sample" / "rollouts.jsonl").read_text().splitlines()
    assert len(graded) == 6
