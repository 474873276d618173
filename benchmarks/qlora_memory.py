"""QLoRA GRPO on the Qwen2.5-VL-7B architecture: peak memory and time per phase of a step.

Builds Qwen2.5-VL-7B-Instruct's architecture from its published config with random
weights (nothing is downloaded), saves it with the embedded tiny model's processor,
and trains it through the project's own path: `GRPOModule(policy=PolicySpec(
model=<folder>, quantization=4-bit, lora=..., gradient_checkpointing=True))` under a
Lightning Trainer
on synthetic shapes data. Random weights practically never sample EOS, so every
completion runs to `--max-new-tokens`: the worst case. The module's `phase_meter`
(pebr_lightning/metrics/phases.py) times each phase and records its peak memory;
this script collects it after every step and prints, per phase, the peak (max over
the measured steps) and the seconds per step (median), leaving out the first step
as warm-up when more than one ran. The issue's target: peak <= 20 GiB on one 24 GB
GPU. On CUDA the peak is tensor bytes allocated by PyTorch; on CPU it is the whole
process's resident memory (see phases.py). Prompts are short (the tiny processor
caps images at 112x112 px, 16 image tokens): the G x 512 completion tokens dominate.

Precision: bf16-true by default, with bfloat16 4-bit compute (what the CPU figures in
docs/BENCHMARKS.md used; on the 2-core CPU also faster than 32-true with float32
compute). The shipped configs/qlora-24gb use bf16-mixed, which keeps the LoRA weights
in float32; their headers give the matching `--precision bf16-mixed` command. "small" keeps
the 152,064-token vocabulary, so logits and sampling cost per token what they cost
at 7B. Results and notes: docs/BENCHMARKS.md.

    python benchmarks/qlora_memory.py --size 7b                 # GPU: 2 prompts x G=8, 512 tokens
    python benchmarks/qlora_memory.py --size small --device cpu # the same path shrunk, on CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning as L
import torch

PHASES = ("rollout", "score", "logprobs", "backward", "optimizer")
TARGET_GIB = 20.0  # one step on a 24 GB card, with room for the CUDA context
MOONSHOT_GIB = 14.0  # ... and on a 16 GB card
GIB = 2**30
# What the module logged, kept per step to show that the LoRA weights got a gradient.
LOGGED = ("train/grad_norm", "reward/total/std", "completion/length_mean")
# Written last into a checkpoint folder: its size and parameter counts (a folder
# without it is an unfinished write and is written again).
MARKER = "pebr_benchmark.json"
TOKEN_NAMES = ("endoftext", "im_end", "image_pad", "video_pad", "vision_start", "vision_end")
# Scores each completion by its place in its group: every group has spread whatever
# random weights decode to, so every step runs the full update being measured.
SPREAD_REWARD = "pebr_demo.testing.spread_reward.GroupPositionReward"

# Qwen2.5-VL-7B-Instruct's published config.json (special token ids come from the
# tokenizer used here instead). "small" keeps every ratio that shapes the code path
# (head_dim 128 with mrope_section 16/24/24, GQA, the 152,064-token vocab, windowed
# vision attention with a last full-attention block) and shrinks depth and width.
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "7b": {
        "text": {
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
        },
        "vision": {
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "fullatt_block_indexes": [7, 15, 23, 31],
        },
    },
    "small": {
        "text": {
            "hidden_size": 256,
            "intermediate_size": 1024,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
        },
        "vision": {
            "depth": 2,
            "hidden_size": 160,
            "intermediate_size": 432,
            "num_heads": 2,
            "fullatt_block_indexes": [1],
        },
    },
}
TEXT_COMMON = {
    "vocab_size": 152064,
    "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
}
VISION_COMMON = {
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "tokens_per_second": 2,
    "hidden_act": "silu",
}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    if args.size == "7b" and args.device == "cpu" and not args.force:
        print(
            "error: --size 7b --device cpu is not a goal of this benchmark (a 7B QLoRA step "
            "would take hours on a CPU and its RSS says nothing about a GPU); run it on a GPU, "
            "use --size small on CPU, or add --force",
            file=sys.stderr,
        )
        return 2
    header = describe_run(f"python benchmarks/qlora_memory.py {shlex.join(given)}".rstrip(), args)
    for key, value in header.items():
        print(f"{key}: {value}")
    with tempfile.TemporaryDirectory(prefix="pebr-qlora-", dir=args.workdir) as scratch:
        where = Path(args.checkpoint) if args.checkpoint else Path(scratch) / "model"
        folder, params = ensure_checkpoint(where, args.size, args.device)
        steps, loaded = train(args, folder, Path(scratch))
    model = {**params, **loaded}
    figures = summarize(steps)
    meets = report(model, steps, figures, args)
    if args.out:
        result = {
            **header,
            "settings": {k: v for k, v in vars(args).items() if k not in ("out", "workdir")},
            "model": model,
            **figures,
            "target_gib": TARGET_GIB,
            "moonshot_gib": MOONSHOT_GIB,
            "meets_moonshot": None
            if figures["overall"]["peak_gib"] is None
            else figures["overall"]["peak_gib"] <= MOONSHOT_GIB,
            "meets_target": meets,
            "steps": steps,
        }
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", choices=("7b", "small"), default="7b")
    parser.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="default: cuda if available",
    )
    parser.add_argument("--steps", type=int, default=3, help="GRPO steps (the first is warm-up)")
    parser.add_argument(
        "--prompts", type=int, default=None, help="prompts per step (7b: 2, small: 1)"
    )
    parser.add_argument("--group-size", type=int, default=8, help="completions per prompt, G")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--micro-batch-size", type=int, default=None, help="(7b: 4, small: 8)")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--precision", default="bf16-true", help="Lightning precision")
    parser.add_argument("--compute-dtype", default="bfloat16", help="4-bit matmul dtype")
    parser.add_argument("--out", help="also write the figures to this JSON file")
    parser.add_argument(
        "--workdir", help="folder for the temporary checkpoint (7b: ~17 GB; default: system temp)"
    )
    parser.add_argument(
        "--checkpoint",
        help="keep the random-weight checkpoint in this folder, or reuse the one written "
        "there before (benchmarks/rollout_speed.py reads the same; default: a temporary folder)",
    )
    parser.add_argument("--force", action="store_true", help="allow --size 7b --device cpu")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available (use --device cpu)")
    if args.prompts is None:
        args.prompts = 2 if args.size == "7b" else 1
    if args.micro_batch_size is None:
        args.micro_batch_size = 4 if args.size == "7b" else 8
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    return args


def describe_machine(device: str) -> str:
    cpu = f"{os.cpu_count()} CPUs ({platform.machine()}, {cpu_model()})"
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        return f"{props.name}, {props.total_memory / GIB:.1f} GiB; {cpu}"
    return f"{cpu}, torch threads={torch.get_num_threads()}, no GPU used"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def describe_run(command: str, args: argparse.Namespace) -> dict[str, str]:
    """The lines above the table: command, date, machine, versions, settings."""
    import bitsandbytes
    import transformers

    return {
        "command": command,
        "date": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "machine": describe_machine(args.device),
        "versions": (
            f"torch {torch.__version__}, transformers {transformers.__version__}, "
            f"bitsandbytes {bitsandbytes.__version__}"
        ),
        "settings": (
            f"{args.size} model, {args.prompts} prompts x G={args.group_size} = "
            f"{args.prompts * args.group_size} completions of {args.max_new_tokens} tokens per "
            f"step, micro-batch {args.micro_batch_size}, {args.steps} steps, 4-bit NF4 (double "
            f"quant, compute {args.compute_dtype}) + LoRA r={args.lora_r}, gradient "
            f"checkpointing, precision {args.precision}"
        ),
    }


def ensure_checkpoint(folder: str | Path, size: str, device: str) -> tuple[Path, dict[str, int]]:
    """The random-weight checkpoint of `size` in `folder`: reused if one was written
    there before (its MARKER file names the size), else written now."""
    folder = Path(folder)
    marker = folder / MARKER
    if marker.is_file():
        written = json.loads(marker.read_text())
        if written.get("size") == size:
            print(f"random-weight checkpoint reused: {folder}")
            return folder, written["parameters"]
        raise ValueError(
            f"{folder} holds the {written.get('size')!r} checkpoint, not {size!r}; "
            "pass another --checkpoint folder"
        )
    started = time.perf_counter()
    _, params = write_checkpoint(folder, size, device)
    marker.write_text(json.dumps({"size": size, "parameters": params}) + "\n")
    print(f"random-weight checkpoint written in {time.perf_counter() - started:.0f} s: {folder}")
    return folder, params


def write_checkpoint(out: Path, size: str, device: str) -> tuple[Path, dict[str, int]]:
    """The architecture of `size` with random bf16 weights + the tiny model's processor."""
    from transformers import (
        AutoProcessor,
        GenerationConfig,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
    )

    from pebr_demo.models.tiny import ensure_tiny_model

    processor = AutoProcessor.from_pretrained(ensure_tiny_model("tiny-qwen2.5-vl"))
    tok = processor.tokenizer
    ids = {name: tok.convert_tokens_to_ids(f"<|{name}|>") for name in TOKEN_NAMES}
    spec = SIZES[size]
    config = Qwen2_5_VLConfig(
        text_config={
            **TEXT_COMMON,
            **spec["text"],
            "bos_token_id": ids["endoftext"],
            "eos_token_id": ids["im_end"],
            "pad_token_id": ids["endoftext"],
        },
        vision_config={
            **VISION_COMMON,
            **spec["vision"],
            "out_hidden_size": spec["text"]["hidden_size"],
        },
        image_token_id=ids["image_pad"],
        video_token_id=ids["video_pad"],
        vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    # Initialising 8 B weights is much faster on the GPU; they are freed after saving.
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(
        eos_token_id=[ids["im_end"], ids["endoftext"]],
        pad_token_id=ids["endoftext"],
        bos_token_id=ids["endoftext"],
    )
    params = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "language_parameters": sum(
            p.numel() for n, p in model.named_parameters() if not _is_vision(n)
        ),
        "vision_parameters": sum(p.numel() for n, p in model.named_parameters() if _is_vision(n)),
    }
    model.save_pretrained(out)
    processor.save_pretrained(out)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out, params


def train(args: argparse.Namespace, folder: Path, scratch: Path) -> tuple[list[dict], dict]:
    """Run `args.steps` GRPO steps; per-step phase figures and facts about the loaded model."""
    from pebr_demo.data.synth import write_dataset
    from pebr_lightning.data.datamodule import ManifestDataModule
    from pebr_lightning.models.policy import LoraConfig, PolicySpec, QuantizationConfig, unwrap
    from pebr_lightning.models.rollout import SamplingConfig
    from pebr_lightning.modules.grpo import GRPOModule
    from pebr_lightning.modules.grpo_update import UpdateConfig
    from pebr_lightning.modules.optim import OptimConfig

    L.seed_everything(0, verbose=False)
    manifest = write_dataset(scratch / "data", n=args.prompts * args.steps, seed=0)
    module = GRPOModule(
        policy=PolicySpec(
            model=str(folder),
            lora=LoraConfig(r=args.lora_r, alpha=2 * args.lora_r, dropout=0.0),
            quantization=QuantizationConfig(bits=4, compute_dtype=args.compute_dtype),
            gradient_checkpointing=True,
            dtype="bfloat16",
        ),
        rewards=[{"class_path": SPREAD_REWARD, "weight": 1.0}, {"name": "format", "weight": 0.1}],
        sampling=SamplingConfig(group_size=args.group_size, max_new_tokens=args.max_new_tokens),
        optim=OptimConfig(lr=1e-5, weight_decay=0.01, schedule="constant"),
        log_samples_every_n_steps=0,
        update=UpdateConfig(micro_batch_size=args.micro_batch_size),
    )
    data = ManifestDataModule(train_manifest=str(manifest), batch_size=args.prompts)
    recorder = PhaseRecorder()
    trainer = L.Trainer(
        accelerator=args.device,
        devices=1,
        precision=args.precision,
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=scratch,
        callbacks=[recorder],
    )
    trainer.fit(module, datamodule=data)
    base = unwrap(module.policy)
    four_bit = sum(
        p.numel() * p.element_size() for p in base.parameters() if type(p).__name__ == "Params4bit"
    )
    info = {
        "footprint_bytes": base.get_memory_footprint(),
        "four_bit_bytes": four_bit,
        "prompt_tokens": recorder.prompt_tokens,
        "image_tokens": recorder.image_tokens,
    }
    return recorder.steps, info


def _is_vision(name: str) -> bool:
    return ".visual." in f".{name}"


class PhaseRecorder(L.Callback):
    """After each training step: the module's phase figures plus the step's wall time."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self.prompt_tokens = 0
        self.image_tokens = 0
        self._started = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        _sync(pl_module.device)
        self._started = time.perf_counter()
        image_id = pl_module.policy.config.image_token_id
        self.prompt_tokens = int(batch["input_ids"].shape[1])
        self.image_tokens = int((batch["input_ids"][0] == image_id).sum())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        _sync(pl_module.device)
        seconds = time.perf_counter() - self._started
        meter = getattr(pl_module, "phase_meter", None)
        if meter is None:
            raise RuntimeError("GRPOModule has no phase_meter: this benchmark needs it")
        logged = {
            k: float(trainer.callback_metrics[k]) for k in LOGGED if k in trainer.callback_metrics
        }
        self.steps.append({"seconds": seconds, "phases": meter.results, "logged": logged})


def report(model: dict, steps: list[dict], figures: dict, args: argparse.Namespace) -> bool | None:
    """Print the model, the table and the verdict; whether the peak meets the target."""
    print(
        f"model: {model['parameters'] / 1e9:.2f} B parameters "
        f"(language model {model['language_parameters'] / 1e9:.2f} B, "
        f"vision {model['vision_parameters'] / 1e9:.2f} B); as loaded "
        f"{model['footprint_bytes'] / GIB:.2f} GiB (get_memory_footprint), of which "
        f"4-bit weights {model['four_bit_bytes'] / GIB:.2f} GiB"
    )
    print(
        f"prompt length: {model['prompt_tokens']} tokens "
        f"({model['image_tokens']} of them image tokens)"
    )
    warm_up = "first step left out as warm-up" if len(steps) > 1 else "no warm-up step"
    print(f"measured: steps {figures['measured_steps']} of {len(steps)} ({warm_up})")
    last = steps[-1]["logged"]
    note = " (0: every group's rewards were equal)" if last.get("train/grad_norm") == 0 else ""
    print("last step: " + ", ".join(f"{k} {last[k]:.4g}" for k in LOGGED if k in last) + note)
    print()
    for line in table(figures):
        print(line)
    print()
    overall = figures["overall"]
    peak = overall["peak_gib"]
    print(
        f"overall: peak {fmt(peak)} GiB (in {overall['peak_phase'] or '-'}), "
        f"step {overall['step_seconds']:.2f} s (median wall time; phases sum to "
        f"{overall['phase_seconds']:.2f} s)"
    )
    meets = None if peak is None else peak <= TARGET_GIB
    print(f"target: peak <= {TARGET_GIB:.0f} GiB: {verdict(meets, args)}")
    moonshot = None if peak is None else peak <= MOONSHOT_GIB
    print(f"moonshot: peak <= {MOONSHOT_GIB:.0f} GiB (a 16 GB card): {verdict(moonshot, args)}")
    return meets


def summarize(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Per phase: peak GiB (max) and seconds (median) over the steps after the warm-up."""
    measured = steps[1:] if len(steps) > 1 else steps
    names = [n for n in PHASES if any(n in s["phases"] for s in measured)]
    names += [n for s in measured for n in s["phases"] if n not in names]  # phases added later
    phases = {}
    for name in names:
        peaks = [s["phases"][name]["peak_bytes"] for s in measured if name in s["phases"]]
        known = [p for p in peaks if p is not None]
        phases[name] = {
            "peak_gib": max(known) / GIB if known else None,
            # a phase a step skipped took 0 s in that step
            "seconds": statistics.median(
                s["phases"][name]["seconds"] if name in s["phases"] else 0.0 for s in measured
            ),
        }
    peaked = [(f["peak_gib"], n) for n, f in phases.items() if f["peak_gib"] is not None]
    peak, peak_phase = max(peaked) if peaked else (None, None)
    return {
        "measured_steps": len(measured),
        "phases": phases,
        "overall": {
            "peak_gib": peak,
            "peak_phase": peak_phase,
            "step_seconds": statistics.median(s["seconds"] for s in measured),
            "phase_seconds": sum(f["seconds"] for f in phases.values()),
        },
    }


def table(figures: dict[str, Any]) -> list[str]:
    lines = ["| phase | peak GiB | seconds / step |", "|---|---|---|"]
    for name, f in figures["phases"].items():
        lines.append(f"| {name} | {fmt(f['peak_gib'])} | {f['seconds']:.4g} |")
    return lines


def fmt(gib: float | None) -> str:
    return "-" if gib is None else f"{gib:.3f}"


def verdict(meets: bool | None, args: argparse.Namespace) -> str:
    if meets is None:
        return "unknown (no peak measured on this device)"
    answer = "met" if meets else "NOT met"
    if args.size != "7b" or args.device != "cuda":
        return (
            f"{answer} here, but the target is about --size 7b on a GPU: this run does not test it"
        )
    return answer


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    sys.exit(main())
