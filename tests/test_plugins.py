"""The example plugin package, installed the way a user installs one.

A throw-away environment sees this project's packages (a .pth file adds our
site-packages) but has its own site-packages, so `pip install -e` and
`pip uninstall` of the plugin there leave the development environment untouched.
The steps run in order: install -> listed, checked, its own tests, used by name
in a GRPO fit -> uninstall -> gone, and a config naming it fails clearly.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PLUGIN = REPO / "plugins" / "pebr-count-check"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}


@pytest.fixture(scope="module")
def child(tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("plugin-env") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.check_output(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
    ).strip()
    ours = sysconfig.get_paths()["purelib"]
    # addsitedir (not a plain path line) so our editable-install .pth files are read too
    Path(site, "_pebr_dev_env.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
    return python


def pip(python: Path, *args: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "pip", "--python", str(python), *args])


def run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, env=ENV, timeout=600, **kwargs
    )


def pebr(python: Path, *args: str) -> subprocess.CompletedProcess:
    return run([python, "-m", "pebr_lightning.cli", *args], cwd=REPO)


def test_the_example_pins_the_range_the_guide_recommends():
    """A range that admits this release and stops before the next series, written as
    docs/plugins.md ("Build and publish") tells plugin authors to write it."""
    import re
    from importlib.metadata import version

    from packaging.requirements import Requirement
    from packaging.version import Version

    ours = Version(version("pebr-lightning"))
    assert f'\nversion = "{ours}"\n' in (REPO / "pyproject.toml").read_text()
    text = (PLUGIN / "pyproject.toml").read_text()
    (dependencies,) = re.findall(r"^dependencies = \[(.*)\]$", text, flags=re.MULTILINE)
    (pin,) = [Requirement(d) for d in re.findall(r'"([^"]+)"', dependencies)]
    assert pin.name == "pebr-lightning"
    series = f"{ours.major}.{ours.minor}"
    upper = f"{ours.major}.{ours.minor + 1}" if ours.major == 0 else f"{ours.major + 1}"
    assert str(pin.specifier) == f"<{upper},>={series}"
    assert ours in pin.specifier and Version(upper) not in pin.specifier
    guide = (REPO / "docs" / "plugins.md").read_text()
    assert f'dependencies = ["pebr-lightning>={series},<{upper}"]' in guide
    assert "python -m build" in guide and "twine upload dist/*" in guide


def test_not_installed_at_first(child):
    listed = pebr(child, "rewards", "list")
    assert listed.returncode == 0, listed.stderr
    assert "count_check" not in listed.stdout
    assert "format" in listed.stdout  # the built-ins come through the same entry points


def test_pip_install_registers_the_reward(child):
    installed = pip(child, "install", "--no-deps", "--no-build-isolation", "-e", str(PLUGIN))
    assert installed.returncode == 0, installed.stdout + installed.stderr
    listed = pebr(child, "rewards", "list")
    line = next(ln for ln in listed.stdout.splitlines() if "count_check" in ln)
    assert "pebr-count-check" in line and "0.1.0" in line
    assert "Share of count checks" in line  # first line of the class docstring


def test_rewards_check_passes_on_real_samples(child):
    checked = pebr(child, "rewards", "check", "count_check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "FAIL" not in checked.stdout


def test_the_plugins_own_tests_pass(child):
    result = run(
        [child, "-m", "pytest", "-q", "-p", "no:cacheprovider", PLUGIN / "tests"], cwd=PLUGIN
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert " passed" in result.stdout


def test_usable_by_name_in_a_grpo_config(child, tmp_path, shapes_data):
    spread = {"class_path": "pebr_demo.testing.spread_reward.VowelShareReward"}
    rewards = [{"name": "format", "weight": 0.5}, {"name": "count_check", "weight": 0.5}, spread]
    snapshot = tmp_path / "snapshot.pt"
    fit = pebr(
        child, "fit", "--config", str(REPO / "configs" / "demo" / "reasoning.yaml"),
        "--model.init_args.rewards", json.dumps(rewards),
        "--model.init_args.sampling.max_new_tokens", "8",
        "--model.init_args.sampling.group_size", "2",
        "--data.init_args.train_manifest", str(shapes_data["train"]),
        "--data.init_args.batch_size", "2",
        "--trainer.max_steps", "2",  # LoRA A gets gradient once B moved
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.callbacks+=pebr_demo.testing.ParameterSnapshot",
        f"--trainer.callbacks.path={snapshot}",
    )  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]
    (metrics,) = tmp_path.rglob("metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    assert any(r.get("reward/count_check/mean") for r in rows)
    assert all(math.isfinite(float(v)) for r in rows for v in r.values() if v)
    snap = torch.load(snapshot)
    # the demo reasoning config fine-tunes the whole policy; its KL reference is frozen
    assert snap["trainable"] and all(n.startswith("policy.") for n in snap["trainable"])
    assert all(not torch.equal(snap["before"][n], snap["after"][n]) for n in snap["trainable"])


def test_uninstall_removes_it_and_a_config_naming_it_fails_clearly(child, tmp_path, shapes_data):
    removed = pip(child, "uninstall", "-y", "pebr-count-check")
    assert removed.returncode == 0, removed.stderr
    assert "count_check" not in pebr(child, "rewards", "list").stdout
    fit = pebr(
        child, "fit", "--config", str(REPO / "configs" / "demo" / "reasoning.yaml"),
        "--model.init_args.rewards", json.dumps([{"name": "count_check"}]),
        "--data.init_args.train_manifest", str(shapes_data["train"]),
        "--trainer.default_root_dir", str(tmp_path),
    )  # fmt: skip
    assert fit.returncode == 2
    assert "count_check" in fit.stderr and "Traceback" not in fit.stderr
