"""The README's promises: two quickstart commands that exist, a layout that lists every file."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def quickstart_commands() -> list[str]:
    block = README.split("## Quickstart", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.strip().splitlines()]


def test_quickstart_is_exactly_demo_and_test_and_ci_runs_the_test_command():
    assert quickstart_commands() == ["make demo", "make test"]
    ci = [
        line.strip()
        for line in (REPO / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))
    ]
    assert ci == ["make test"]


def test_layout_lists_every_package_file():
    layout = README.split("## Layout", 1)[1]
    listed = set(re.findall(r"\b(\w+\.py)\b", layout))
    missing = [
        str(path.relative_to(REPO))
        for path in (REPO / "pebr_lightning").rglob("*.py")
        if path.name != "__init__.py" and path.name not in listed
    ]
    assert not missing, f"README layout lacks: {missing}"


def test_make_demo_runs_the_schedule_in_a_short_mode(tmp_path):
    """The README's main command on a cut-down schedule (2 SFT steps, 4 held-out
    questions): it writes the data, trains, evaluates and prints the closing table."""
    sft = yaml.safe_load((REPO / "configs" / "demo" / "sft.yaml").read_text())
    sft["trainer"]["callbacks"][1]["init_args"] = {"save_last": True}
    sft["trainer"].update(
        val_check_interval=None, limit_val_batches=0, max_steps=2, log_every_n_steps=1
    )
    sft["data"]["init_args"].update(batch_size=4, num_workers=0)
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(sft))
    data = tmp_path / "data"
    schedule = {
        "out": str(tmp_path / "out"),
        "model": "tiny-qwen2.5-vl",
        "data": {split: str(data / split / "manifest.jsonl") for split in ("train", "test")},
        "synth": {"train": 8, "test": 4, "seed": 0},
        "eval": {"max_new_tokens": 4, "progress": False},
        "stages": {"sft": {"config": str(tmp_path / "sft.yaml")}},
    }
    (tmp_path / "schedule.yaml").write_text(yaml.safe_dump(schedule))
    result = subprocess.run(
        ["make", "demo", f"DEMO_CONFIG={tmp_path / 'schedule.yaml'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "writing 8 synthetic train records" in result.stdout
    assert re.search(r"\| sft \| train/loss \| \d+\.\d+ \| \d+\.\d+ \| \d\.\d+ \|", result.stdout)
    assert (tmp_path / "out" / "sft" / "DONE.json").exists()


def using_it_blocks() -> list[list[list[str]]]:
    """The commands of each ```sh block under "Using it", as argument lists
    (continuation lines joined, comments dropped)."""
    import shlex

    section = README.split("## Using it", 1)[1].split("\n## ", 1)[0]
    blocks = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.S):
        lines = [re.sub(r"\s+#\s.*$", "", line).rstrip() for line in block.splitlines()]
        text = "\n".join(line for line in lines if line).replace("\\\n", " ")
        blocks.append([shlex.split(command) for command in text.splitlines()])
    return blocks


# What makes each README command tiny: appended arguments (the last value wins).
# The 2-step SFT model answers nothing right, so the splits `pebr sample` writes
# are empty; the RL stages then train on the demo's train split instead.
TINY_GRPO = [
    "--trainer.max_steps=2",
    "--model.init_args.sampling.group_size=2",
    "--model.init_args.sampling.max_new_tokens=8",
    "--data.init_args.train_manifest=data/demo/train/manifest.jsonl",
    "--data.init_args.batch_size=2",
]
TINY = {
    ("data", "synth"): ["--n", "8"],
    ("fit", "configs/demo/sft.yaml"): [
        "--trainer.max_steps=2",
        "--trainer.val_check_interval=null",
        "--trainer.limit_val_batches=1",
        "--data.init_args.batch_size=4",
    ],
    ("fit", "configs/demo/perception.yaml"): TINY_GRPO,
    ("fit", "configs/demo/reasoning.yaml"): TINY_GRPO,
    ("test", "configs/demo/reasoning.yaml"): [
        "--trainer.limit_test_batches=1",
        "--data.init_args.eval_batch_size=2",
        "--model.init_args.sampling.max_new_tokens=8",
    ],
    ("eval",): ["--limit", "2", "--samples", "2", "--max-new-tokens", "8"],
    ("sample",): ["--limit", "2", "--k", "2", "--easy-min", "2", "--max-new-tokens", "8"],
}


def tiny(args: list[str]) -> list[str]:
    for key, extra in TINY.items():
        if all(word in args[1:] for word in key):
            return [*args, *extra]
    return args


def test_using_it_runs_as_written_in_order_on_a_fresh_copy(tmp_path):
    """Every command of the first block, in order, in a copy of the tracked files:
    each exits 0, and each writes what the next one reads."""
    (embedded, real, _own_data) = using_it_blocks()
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    copy = tmp_path / "clone"
    for name in tracked:
        if (REPO / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            (copy / name).write_bytes((REPO / name).read_bytes())
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    pebr = str(Path(os.sys.executable).with_name("pebr"))
    assert [args[0] for args in embedded] == ["pebr"] * len(embedded)
    outputs = {}
    for args in embedded:
        result = subprocess.run(
            [pebr, *tiny(args)[1:]], cwd=copy, capture_output=True, text=True, env=env, timeout=600
        )
        assert result.returncode == 0, (args, result.stdout[-2000:], result.stderr[-2000:])
        outputs[" ".join(args[1:4])] = result.stdout
    sft = "runs/demo/sft/lightning_logs/version_0/checkpoints"
    assert f"weights:    {sft}/last.hf" in outputs["fit --config configs/demo/sft.yaml"]
    assert (copy / "data/demo/test/manifest.jsonl").is_file()
    assert json.loads((copy / "runs/demo/eval-sft/metrics.json").read_text())["n"] == 2
    assert {p.name for p in (copy / "runs/demo/sample").glob("*.jsonl")} >= {
        "easy.jsonl",
        "medium.jsonl",
        "hard.jsonl",
    }
    assert (copy / "runs/demo/reasoning/lightning_logs/version_0/checkpoints/last.hf").is_dir()
    assert "test/accuracy" in outputs["test --config configs/demo/reasoning.yaml"]
    assert (copy / "runs/demo/export").is_dir() and list(
        (copy / "runs/demo/export").rglob("*.safetensors")
    )
    assert "rewards" in outputs["--help"] and "schedule" in outputs["--help"]

    # The real-model block needs a hub and a GPU: its configs must parse as written.
    for args in real:
        if args[0] == "torchrun":
            args = ["pebr", *args[args.index("fit") :]]
        if args[1] == "fit":
            result = subprocess.run(
                [pebr, *args[1:], "--print_config"],
                cwd=copy,
                capture_output=True,
                text=True,
                env=env,
                timeout=300,
            )
            assert result.returncode == 0, (args, result.stderr[-2000:])
        else:
            from pebr_lightning.schedule.config import load_schedule

            assert args[1:3] == ["schedule", "--config"]
            load_schedule(copy / args[3])


def test_bring_your_own_data_validates_each_format_as_written(tmp_path, monkeypatch, capsys):
    """The "Bring your own data" block on a tiny copy of each format, made from the
    synthetic data: every command exits 0 and finds all 4 records valid."""
    import datasets

    from pebr_demo.data.synth import write_dataset
    from pebr_lightning.cli import main

    (_, _, own_data) = using_it_blocks()
    monkeypatch.chdir(tmp_path)
    manifest = write_dataset(tmp_path / "my", n=4, seed=0)
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    manifest.rename(tmp_path / "my" / "questions.jsonl")
    conversations = [
        {
            "conversations": [
                {"from": "human", "value": f"<image>{r['question']}"},
                {"from": "gpt", "value": f"The answer is {r['answer']}."},
            ],
            "images": [r["image"]],
        }
        for r in records
    ]
    (tmp_path / "my" / "sharegpt.json").write_text(json.dumps(conversations))
    rows = [
        {
            "id": r["id"],
            "problem": r["question"],
            "answer": r["answer"],
            "images": [{"bytes": (tmp_path / "my" / r["image"]).read_bytes(), "path": None}],
        }
        for r in records
    ]
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(str(tmp_path / "my" / "geometry.parquet"))
    ours = table.rename_columns({"problem": "question"}).map(
        lambda row: {"image": row["images"][0]}, remove_columns=["images"]
    )
    ours = ours.cast_column("image", datasets.Image())
    datasets.DatasetDict({"train": ours}).save_to_disk(str(tmp_path / "my" / "saved"))
    (tmp_path / "acme" / "geometry" / "data").mkdir(parents=True)
    ours.to_parquet(str(tmp_path / "acme" / "geometry" / "data" / "train-00000-of-00001.parquet"))

    assert [args[:3] for args in own_data] == [["pebr", "data", "validate"]] * 5
    for args in own_data:
        assert main(args[1:]) == 0, args
        assert capsys.readouterr().out.strip() == f"{args[3]}: 4 records OK", args
