"""ShareGPT and OpenAI `messages` records as SFT data: validation by file, line and
field; the assistant turns trained as written, every other token masked; through
`pebr fit`. Real tiny processor and model (tests/conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pebr_demo.data.synth import write_dataset
from pebr_lightning.algorithms.logprobs import IGNORE_INDEX
from pebr_lightning.cli import main
from pebr_lightning.data.collate import RecordDataset, SFTCollator, encode_conversation
from pebr_lightning.data.manifest import load_manifest
from pebr_lightning.data.prompts import PEBR_INSTRUCTION, PromptConfig, record_response
from pebr_lightning.errors import ManifestError
from pebr_lightning.models.policy import load_processor

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def processor(tiny_path):
    return load_processor(str(tiny_path), False)


@pytest.fixture
def shapes(tmp_path) -> list[dict]:
    manifest = write_dataset(tmp_path / "shapes", n=6, seed=0)
    records = load_manifest(manifest).records
    return records


def sharegpt(record: dict) -> dict:
    """A question record as LLaMA-Factory's ShareGPT layout holds it."""
    return {
        "conversations": [
            {"from": "human", "value": f"<image>{PEBR_INSTRUCTION}\n{record['question']}"},
            {"from": "gpt", "value": record_response(record)},
        ],
        "images": [record["image"]],
    }


def messages(record: dict) -> dict:
    """The same in the OpenAI layout, with content parts."""
    text = f"{PEBR_INSTRUCTION}\n{record['question']}"
    return {
        "id": f"m-{record['id']}",
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]},
            {"role": "assistant", "content": record_response(record)},
        ],
        "images": [record["image"]],
    }


def test_a_conversation_trains_on_the_same_tokens_as_its_question_record(processor, shapes):
    """One sample in both layouts: the same ids and the same trained tokens; the
    conversation adds only the template's newline after the end of turn, untrained."""
    collate = SFTCollator(processor, PromptConfig())
    dataset = RecordDataset(shapes[:1])
    classic = collate([dataset[0]])
    for layout in (sharegpt, messages):
        record = layout(shapes[0])
        out = encode_conversation(processor, {"id": "c", **record}, [dataset[0]["image"]])
        length = int(classic["attention_mask"][0].sum())
        assert out["input_ids"][:length] == classic["input_ids"][0, :length].tolist()
        assert processor.tokenizer.decode(out["input_ids"][length:]) == "\n"
        assert out["labels"] == [*classic["labels"][0, :length].tolist(), IGNORE_INDEX]
        assert out["images"]["image_grid_thw"].tolist() == classic["image_grid_thw"].tolist()


def test_multi_turn_trains_every_assistant_turn_and_nothing_else(processor, shapes):
    record = {
        "id": "two-turns",
        "system": "You count shapes.",
        "conversations": [
            {"from": "human", "value": "<image>How many shapes?"},
            {"from": "gpt", "value": "There are 3."},
            {"from": "human", "value": "And squares?"},
            {"from": "gpt", "value": "One square."},
        ],
        "images": [shapes[0]["image"]],
    }
    item = RecordDataset([record])[0]
    out = encode_conversation(processor, record, item["images"])
    tokenizer = processor.tokenizer
    trained, spans, current = [], [], []
    for token, label in zip(out["input_ids"], out["labels"], strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
        trained.append(label != IGNORE_INDEX)
    assert spans == ["There are 3.<|im_end|>", "One square.<|im_end|>"]
    text = tokenizer.decode(out["input_ids"])
    assert "You count shapes." in text and "And squares?" in text  # in the ids, not trained


def test_a_mixed_batch_pads_each_sample_and_keeps_image_order(processor, shapes):
    collate = SFTCollator(processor, PromptConfig())
    records = [shapes[0], {"id": "c1", **sharegpt(shapes[1])}, shapes[2]]
    dataset = RecordDataset([shapes[0]])
    items = [
        dataset[0],
        {"record": records[1], "images": [RecordDataset([shapes[1]])[0]["image"]]},
        RecordDataset([shapes[2]])[0],
    ]
    batch = collate(items)
    assert batch["ids"] == [shapes[0]["id"], "c1", shapes[2]["id"]]
    assert batch["image_grid_thw"].shape[0] == 3
    alone = collate([items[2]])
    length = int(alone["attention_mask"][0].sum())
    assert batch["input_ids"][2, :length].tolist() == alone["input_ids"][0, :length].tolist()
    patches = int(batch["image_grid_thw"].prod(-1).sum())
    assert batch["pixel_values"].shape[0] == patches


BAD = [
    (
        {"conversations": [{"from": "robot", "value": "hi"}], "images": []},
        "field 'conversations[0].from': expected one of assistant, gpt, human, system, user, "
        "got 'robot'",
    ),
    (
        {"conversations": [{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"}]},
        "field 'images': the turns hold 1 image placeholder(s)",
    ),
    (
        {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q2"}]},
        "field 'messages': user and assistant turns must alternate",
    ),
    (
        {"messages": [{"role": "user", "content": "q"}]},
        "field 'messages': the last turn must be the assistant's",
    ),
    (
        {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]},
        "field 'messages[0].content': expected a string, or a list of text and image parts",
    ),
]


@pytest.mark.parametrize(("record", "message"), BAD)
def test_bad_conversations_name_file_line_and_field(tmp_path, record, message):
    good = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    manifest = tmp_path / "chat.jsonl"
    manifest.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(ManifestError) as info:
        load_manifest(manifest)
    assert f"{manifest}:2: {message}" in str(info.value)


def test_a_json_array_file_is_read_and_its_records_are_counted(tmp_path, shapes):
    data = [sharegpt(shapes[0]), {"conversations": "not a list"}]
    manifest = tmp_path / "sharegpt.json"
    manifest.write_text(json.dumps(data))
    with pytest.raises(ManifestError) as info:
        load_manifest(manifest)
    assert (
        f"{manifest}:record 2: field 'conversations': expected a non-empty list of turns "
        "(id sharegpt-2)" in str(info.value)
    )
    manifest.write_text(json.dumps(data[:1]))
    (loaded,) = load_manifest(manifest).records
    assert loaded["id"] == "sharegpt-1" and loaded["images"] == [shapes[0]["image"]]


def test_grpo_refuses_conversation_records_by_name(processor, shapes):
    from pebr_lightning.data.collate import PromptCollator

    record = {"id": "c9", **sharegpt(shapes[0])}
    with pytest.raises(ManifestError, match=r"^sample c9: a conversation record .* is SFT data"):
        PromptCollator(processor, PromptConfig())([{"record": record, "images": []}])


@pytest.mark.parametrize(("layout", "suffix"), [(sharegpt, ".json"), (messages, ".jsonl")])
def test_pebr_fit_trains_sft_on_conversations(tmp_path, shapes, layout, suffix, sft_fit_args):
    records = [layout(r) for r in shapes]
    manifest = tmp_path / f"chat{suffix}"
    if suffix == ".json":
        manifest.write_text(json.dumps(records))
    else:
        manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    code = main(sft_fit_args(manifest, tmp_path / "run", val=manifest))
    assert code == 0
    (metrics,) = (tmp_path / "run").rglob("metrics.csv")
    rows = metrics.read_text().splitlines()
    header = rows[0].split(",")
    losses = [
        float(row.split(",")[header.index("val/loss")])
        for row in rows[1:]
        if row.split(",")[header.index("val/loss")]
    ]
    assert losses and all(0 < loss < 20 for loss in losses)
    assert list((tmp_path / "run").rglob("last.hf/model.safetensors"))
