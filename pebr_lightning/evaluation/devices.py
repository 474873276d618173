"""Where `pebr sample`, `pebr eval` and a schedule's sampling and evaluation run.

`auto` puts the model on the GPU when there is one and on the CPU otherwise. Its
weights are bfloat16 on a GPU that supports it, or, in a schedule, the precision the
stage that produced the weights trained in (`trainer.precision` of its config); on
the CPU they stay float32, where tests compare exact numbers.

    pebr eval --model runs/x/last.hf --manifest test.jsonl --out runs/eval --device cuda:1
    pebr sample ... --device cpu --dtype float32
"""

from __future__ import annotations

import argparse

from pebr_lightning.errors import PebrError

DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`--device` and `--dtype`, the same for every command that runs a model."""
    parser.add_argument(
        "--device",
        default="auto",
        help="where the model runs: auto (cuda when available, else cpu), cpu, cuda, "
        "cuda:1, mps, ... (default: auto)",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPES,
        help="weight dtype: auto is bfloat16 on a GPU that supports it, float32 elsewhere "
        "(default: auto)",
    )


def resolve_device(name: str, label: str = "--device") -> str:
    """`auto` -> "cuda" when CUDA is available, else "cpu"; any other torch device string
    is checked (it parses, its backend is available here, its index exists) and returned.

    Raises:
        PebrError: one line starting with `label` (the option or the file's field).
    """
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise PebrError(
            f"{label}: {name!r} is not a torch device (expected auto, cpu, cuda, cuda:N, mps, ...)"
        ) from None
    backend = getattr(torch, device.type, None)
    if not hasattr(backend, "is_available"):
        raise PebrError(f"{label}: {name!r} is not a device a model can run on here")
    if not backend.is_available():
        why = "no GPU, or a CPU-only torch" if device.type == "cuda" else "not in this build"
        raise PebrError(
            f"{label}: {name} needs a {device.type.upper()} device and none is available here"
            f" (torch.{device.type}.is_available() is False: {why}); use cpu, or auto"
            " (cuda when there is one)"
        )
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if device.index is not None and device.index >= count:
        raise PebrError(
            f"{label}: {name} names device {device.index}, but {count} {device.type} "
            f"device{'s are' if count != 1 else ' is'} visible (numbered from 0)"
        )
    return name


def resolve_dtype(
    name: str,
    device: str,
    precision: str | int | None = None,
    bf16_supported: bool | None = None,
) -> str:
    """The weight dtype name for a model on `device` (`auto` is resolved first).

    `auto` on CUDA is `precision_dtype(precision)` when the training precision of the
    weights is known, else bfloat16; bfloat16 falls back to float32 on a GPU without
    it (`bf16_supported`, read from torch when None). Elsewhere `auto` is float32.
    """
    import torch

    if name not in DTYPES:
        raise PebrError(f"--dtype: {name!r} is not one of {', '.join(DTYPES)}")
    if name != "auto":
        return name
    if device == "auto":
        device = resolve_device(device)
    if torch.device(device).type != "cuda":
        return "float32"
    wanted = "bfloat16" if precision is None else precision_dtype(precision)
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return "float32" if wanted == "bfloat16" and not bf16_supported else wanted


def precision_dtype(precision: str | int) -> str:
    """Lightning's `trainer.precision` -> the dtype its weights compute in.

    bf16, bf16-mixed, bf16-true, transformer-engine -> bfloat16; 16, 16-mixed,
    16-true, transformer-engine-float16 -> float16; 32, 32-true, 64-true, ... -> float32.
    """
    text = str(precision)
    if text.startswith("bf16") or text == "transformer-engine":
        return "bfloat16"
    if text in ("16", "16-mixed", "16-true", "transformer-engine-float16"):
        return "float16"
    return "float32"
