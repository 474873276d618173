"""Session-wide test settings: offline, one embedded-model cache, small shared datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing in the suite may wait on the hub: set before transformers is imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def pebr_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the embedded tiny model once per session, in a private cache folder.

    Subprocesses inherit PEBR_CACHE, so they reuse it too.
    """
    if "PEBR_TEST_CACHE" in os.environ:  # reuse across local runs when set
        cache = Path(os.environ["PEBR_TEST_CACHE"])
    else:
        cache = tmp_path_factory.mktemp("pebr-cache")
    os.environ["PEBR_CACHE"] = str(cache)
    # `datasets` caches what it loads (Parquet as Arrow); keep it out of the home folder.
    os.environ["HF_DATASETS_CACHE"] = str(cache / "datasets")
    return cache


@pytest.fixture(scope="session")
def tiny_path(pebr_cache: Path) -> Path:
    from pebr_demo.models.tiny import ensure_tiny_model

    return ensure_tiny_model("tiny-qwen2.5-vl")


def demo_sft_fit_args(
    train: Path, out: Path, *, val: Path | None = None, steps: int = 2, **options: str
) -> list[str]:
    """`pebr fit` arguments for a few steps of the demo SFT config on `train`, logged
    into `out`; `options` add `--data.init_args.NAME VALUE` pairs (skip_invalid=...)."""
    args = [
        "fit",
        "--config",
        str(REPO / "configs" / "demo" / "sft.yaml"),
        "--data.init_args.train_manifest",
        str(train),
        "--data.init_args.val_manifest",
        str(val) if val is not None else "null",
        "--data.init_args.batch_size",
        "3",
        "--data.init_args.num_workers",
        "0",
    ]
    for name, value in options.items():
        args += [f"--data.init_args.{name}", value]
    if val is not None:
        args += ["--trainer.limit_val_batches", "1", "--trainer.val_check_interval", str(steps)]
    return [*args, "--trainer.max_steps", str(steps), "--trainer.default_root_dir", str(out)]


@pytest.fixture(scope="session")
def sft_fit_args():
    """demo_sft_fit_args, for tests (they do not import one another)."""
    return demo_sft_fit_args


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small synthetic train/val manifests shared by the end-to-end tests."""
    from pebr_demo.data.synth import write_dataset

    root = tmp_path_factory.mktemp("shapes")
    return {
        "train": write_dataset(root / "train", n=48, seed=0),
        "val": write_dataset(root / "val", n=16, seed=1),
    }


def vllm_python() -> Path:
    """The vLLM environment's interpreter (`make vllm-env`; PEBR_VLLM_PYTHON overrides)."""
    return Path(os.environ.get("PEBR_VLLM_PYTHON") or REPO / ".vllm-env" / "bin" / "python")


def vllm_missing() -> str | None:
    """Why the vLLM tests cannot run here (None when they can): the line `make vllm-env`
    left in the environment folder, or a generic one."""
    from pebr_lightning.engines.vllm_setup import UNAVAILABLE

    note = vllm_python().parent.parent / UNAVAILABLE
    if note.is_file():
        return note.read_text().strip()
    if vllm_python().exists():
        return None
    return f"no vLLM environment at {vllm_python()}: make vllm-env"


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """The one visible line, at the end of every run (-q too), saying the vLLM tests
    were skipped and why."""
    missing = vllm_missing()
    if missing is not None and terminalreporter.stats.get("skipped"):
        terminalreporter.write_line(f"vLLM tests SKIPPED: {missing}", yellow=True, bold=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `vllm`-marked tests without the vLLM environment (`make test` builds it where
    the CPU torch it pins can be had; under CI a missing one is an error, so CI runs
    them), and `gpu`-marked ones where the CUDA device they need is absent."""
    from pebr_lightning.engines.vllm_setup import in_ci

    missing = vllm_missing()
    if missing is not None and any(item.get_closest_marker("vllm") for item in items):
        if in_ci(dict(os.environ)):
            raise pytest.UsageError(f"CI is set and the vLLM tests cannot run: {missing}")
        skip = pytest.mark.skip(reason=missing)
        for item in items:
            if item.get_closest_marker("vllm"):
                item.add_marker(skip)
    marked = [item for item in items if item.get_closest_marker("gpu")]
    if not marked or os.environ.get("PEBR_TEST_DEVICE", "cuda") != "cuda":
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(
        reason="needs a CUDA device (none here): benchmarks/gpu_check.sh runs it on a GPU, "
        "and PEBR_TEST_DEVICE=cpu runs it on the CPU"
    )
    for item in marked:
        item.add_marker(skip)
