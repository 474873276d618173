"""benchmarks/gpu_check.sh as its CPU dry run, and the parts it is made of.

The dry run (`--device cpu --quick`) goes through every section the GPU session will
run, shrunk to toy sizes, with the gpu-marked tests run on the CPU: a GPU session
then finds a script that worked the day before, not one that rotted since the last
lucky session.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402
import gpu_wheels  # noqa: E402

GPU_TESTS = {
    "test_grpo_fit_trains_every_policy_weight_on_the_device[32-true]",
    "test_grpo_fit_trains_every_policy_weight_on_the_device[bf16-mixed]",
    "test_sft_fit_lowers_the_loss_on_the_device",
    "test_qlora_fit_quantizes_on_the_device_and_trains_only_lora",
    "test_shared_prompt_logprobs_and_gradients_equal_the_full_forward",
}


def probe_wheel(folder: Path) -> Path:
    """A real (pure-Python) wheel, standing in for the carried ones."""
    folder.mkdir(parents=True)
    wheel = folder / "pebr_probe-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("pebr_probe/__init__.py", "VALUE = 7\n")
        info = "pebr_probe-1.0.dist-info"
        z.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: pebr-probe\nVersion: 1.0\n")
        z.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        z.writestr(
            "pebr_probe-1.0.dist-info/RECORD",
            "pebr_probe/__init__.py,,\npebr_probe-1.0.dist-info/METADATA,,\n"
            "pebr_probe-1.0.dist-info/WHEEL,,\npebr_probe-1.0.dist-info/RECORD,,\n",
        )
    (folder / "PYTHON_VERSION").write_text("{}.{}\n".format(*sys.version_info[:2]))
    gpu_wheels.write_manifest(folder)
    return wheel


def planted_wheel(folder: Path, marker: Path) -> Path:
    """A wheel whose sitecustomize.py (run by Python at every start, from any folder
    on its path) touches `marker`."""
    wheel = folder / "helpful-1.0-py3-none-any.whl"
    info = "helpful-1.0.dist-info"
    files = {
        "sitecustomize.py": f"open({str(marker)!r}, 'w').close()\n",
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: helpful\nVersion: 1.0\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    with zipfile.ZipFile(wheel, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
        z.writestr(f"{info}/RECORD", "".join(f"{n},,\n" for n in files) + f"{info}/RECORD,,\n")
    return wheel


def gpu_check_sh(tmp_path: Path, carried: Path, site: Path | None = None):
    env = {**os.environ, "PYTHON": sys.executable, "PEBR_GPU_WHEELS": str(carried)}
    env.pop("PEBR_GPU_SITE", None)
    if site is not None:
        env["PEBR_GPU_SITE"] = str(site)
    return subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--help"],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=env,
    )  # fmt: skip


def test_a_wheel_not_in_the_manifest_is_refused_before_anything_installs(tmp_path) -> None:
    """Before: every *.whl in the folder was installed, and a planted wheel's
    sitecustomize.py ran in every Python the check started."""
    carried, marker = tmp_path / "wheels", tmp_path / "ran"
    probe_wheel(carried)
    planted = planted_wheel(carried, marker)
    result = gpu_check_sh(tmp_path, carried)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"error: {planted} is not in {carried / 'MANIFEST.json'}" in result.stderr
    assert "installing" not in result.stdout and not marker.exists()


def test_a_wheel_changed_since_the_manifest_is_refused(tmp_path) -> None:
    carried = tmp_path / "wheels"
    wheel = probe_wheel(carried)
    with zipfile.ZipFile(wheel, "a") as z:
        z.writestr("pebr_probe/extra.py", "X = 1\n")
    result = gpu_check_sh(tmp_path, carried)
    assert result.returncode == 1
    assert f"error: {wheel} does not match its sha256" in result.stderr


def test_a_listed_wheel_that_installs_a_startup_hook_is_refused(tmp_path) -> None:
    carried, marker, site = tmp_path / "wheels", tmp_path / "ran", tmp_path / "site"
    probe_wheel(carried)
    planted_wheel(carried, marker)
    gpu_wheels.write_manifest(carried)  # even listed (the manifest rewritten too)
    result = gpu_check_sh(tmp_path, carried, site)
    assert result.returncode == 1
    assert "installs sitecustomize.py, which Python would run at start: refused" in result.stderr
    assert not marker.exists()


def test_the_scratch_folder_must_start_empty_and_a_default_one_is_fresh(tmp_path) -> None:
    carried, site = tmp_path / "wheels", tmp_path / "site"
    probe_wheel(carried)
    site.mkdir()
    (site / "left_over.py").write_text("")
    result = gpu_check_sh(tmp_path, carried, site)
    assert result.returncode == 1 and f"PEBR_GPU_SITE {site} is not empty" in result.stderr
    result = gpu_check_sh(tmp_path, carried)  # no PEBR_GPU_SITE: a new folder, removed after
    assert result.returncode == 0, result.stderr[-2000:]
    made = Path(result.stdout.split("installing 1 carried wheels into ")[1].split()[0])
    assert made.name.startswith("pebr-gpu-site.") and not made.exists()


def test_stale_wheels_are_those_not_wanted_at_their_pin(tmp_path) -> None:
    for name in ("peft-0.1-py3-none-any.whl", "peft-9.9-py3-none-any.whl",
                 "nltk-3.0-py3-none-any.whl", "stray-1.0-py3-none-any.whl"):  # fmt: skip
        (tmp_path / name).write_bytes(b"")
    pins = {"peft": "9.9", "nltk": "3.9"}
    stale = gpu_wheels.stale_wheels(tmp_path, ["peft", "nltk"], pins)
    assert [w.name for w in stale] == [
        "nltk-3.0-py3-none-any.whl",
        "peft-0.1-py3-none-any.whl",
        "stray-1.0-py3-none-any.whl",
    ]


def test_cpu_dry_run_runs_every_section_and_records_its_figures(tmp_path) -> None:
    from pebr_demo.models.tiny import ensure_tiny_model

    ensure_tiny_model()  # the dry run reuses the suite's embedded-model cache
    carried, site, out = tmp_path / "wheels", tmp_path / "site", tmp_path / "out"
    probe_wheel(carried)
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "PEBR_GPU_WHEELS": str(carried),
        "PEBR_GPU_SITE": str(site),
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("PEBR_TEST_DEVICE", None)
    result = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--device", "cpu", "--quick", "--out", str(out),
         "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=600, cwd=REPO, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    text = result.stdout
    assert text.startswith("installing 1 carried wheels into ")
    assert (site / "pebr_probe" / "__init__.py").read_text() == "VALUE = 7\n"
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["mode"] == "quick" and report["device"] == "cpu"
    assert report["environment"]["packages"]["pebr-lightning"] is not None
    sections = report["sections"]
    assert list(sections) == ["tests", "qlora_memory", "rollout_speed", "grpo_vs_trl"]
    assert {s["status"] for s in sections.values()} == {"ok"}, {
        n: s.get("tail") for n, s in sections.items()
    }

    tests = sections["tests"]["figures"]  # the gpu tests really ran, on the CPU
    assert (tests["passed"], tests["failures"], tests["errors"], tests["skipped"]) == (5, 0, 0, 0)
    assert {case.split("::")[-1] for case in tests["cases"]} == GPU_TESTS

    qlora = sections["qlora_memory"]["figures"]
    assert {"rollout", "score", "logprobs", "backward", "optimizer"} <= set(qlora["phases"])
    assert qlora["model"]["four_bit_bytes"] > 0  # it trained through 4-bit weights
    speed = {r["precision"]: r for r in sections["rollout_speed"]["figures"]["precisions"]}
    assert set(speed) == {"4bit", "bf16"}
    for row in speed.values():
        assert row["tokens_per_s"] > 0 and row["limit_step_ms"] > 0
        assert (
            0 < row["ratio_of_limit"] == pytest.approx(row["limit_step_ms"] / row["decode_step_ms"])
        )
        assert row["tokens_generated"] == [8, 8]  # 1 prompt x G 2 x 4 tokens, every rollout
    # packed 4-bit projections read fewer bytes a step than the same ones in bf16
    assert speed["4bit"]["weight_bytes"] < speed["bf16"]["weight_bytes"]
    trl = sections["grpo_vs_trl"]["figures"]
    assert trl["equal_work"] is True and trl["ratio"] > 0

    log = (out / "gpu_check.log").read_text()
    assert "| tests | ok |" in log and "5 passed, 0 failed, 0 skipped" in log
    assert "| rollout_speed | ok |" in text


def test_a_failing_section_is_recorded_and_a_hung_one_is_killed_at_its_limit(tmp_path) -> None:
    log = gpu_check.Tee(tmp_path / "log")
    failing = gpu_check.Section(
        "failing", [sys.executable, "-c", "print('half way'); raise SystemExit(3)"], cap_s=60
    )
    record = gpu_check.run_section(failing, left=60, log=log)
    assert (record["status"], record["rc"], record["tail"]) == ("failed", 3, ["half way"])

    marker = tmp_path / "child-still-running"
    # a child that would outlive its parent: killing the process group ends both
    script = tmp_path / "hang.py"
    script.write_text(
        "import subprocess, sys, time\n"
        "late = 'import sys, time; time.sleep(4); open(sys.argv[1], \"w\")'\n"
        "subprocess.Popen([sys.executable, '-c', late, sys.argv[1]])\n"
        "print('started', flush=True)\n"
        "time.sleep(60)\n"
    )
    hung = gpu_check.Section("hung", [sys.executable, str(script), str(marker)], cap_s=60)
    started = time.monotonic()
    record = gpu_check.run_section(hung, left=2.0, log=log, min_s=0)
    assert record["status"] == "timed out" and record["tail"] == ["started"]
    assert time.monotonic() - started < 10
    time.sleep(5)
    assert not marker.exists()

    absent = gpu_check.Section("absent", [sys.executable, "-c", "pass"], 60, needs="no_such_mod")
    assert gpu_check.run_section(absent, left=60, log=log)["status"] == "skipped"
    late = gpu_check.Section("late", [sys.executable, "-c", "pass"], cap_s=60)
    assert gpu_check.run_section(late, left=5, log=log)["reason"] == "budget spent (5 s left)"
    assert "== failing: failed" in (tmp_path / "log").read_text()


def test_cuda_requested_without_a_gpu_is_refused_before_anything_runs(tmp_path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal cannot happen here")
    result = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--device cuda: no CUDA device is visible" in result.stderr
    assert not (tmp_path / "gpu_check.json").exists()


def test_checkout_registration_makes_the_builtin_rewards_discoverable(tmp_path) -> None:
    """On the GPU machine the project runs from the copied tree, not an install: the
    written .dist-info must carry the same reward entry points an install records."""
    info = gpu_check.write_dist_info(tmp_path, REPO / "pyproject.toml")
    written = importlib.metadata.Distribution.at(info)
    installed = importlib.metadata.distribution("pebr-lightning")
    group = "pebr_lightning.rewards"
    assert written.metadata["Name"] == "pebr-lightning"
    assert written.version == installed.version
    assert {(e.name, e.value) for e in written.entry_points.select(group=group)} == {
        (e.name, e.value) for e in installed.entry_points.select(group=group)
    }
    assert {"format", "accuracy", "length", "keyword", "clip_score"} <= {
        e.name for e in written.entry_points.select(group=group)
    }


def test_slimmed_bitsandbytes_wheel_keeps_only_the_named_libraries_and_installs(tmp_path) -> None:
    wheel = tmp_path / "bitsandbytes-9.9-py3-none-any.whl"
    libs = {f"bitsandbytes/libbitsandbytes_{v}.so": os.urandom(4096) for v in
            ("cpu", "cuda118", "cuda128", "cuda130", "cuda132", "rocm64")}  # fmt: skip
    files = {"bitsandbytes/__init__.py": b"__version__ = '9.9'\n", **libs}
    info = "bitsandbytes-9.9.dist-info"
    files[f"{info}/METADATA"] = b"Metadata-Version: 2.1\nName: bitsandbytes\nVersion: 9.9\n"
    files[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr(f"{info}/RECORD", record)

    gpu_wheels.slim_wheel(wheel, ("cpu", "cuda13"))
    kept = {"cpu", "cuda130", "cuda132"}
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert {n for n in names if ".so" in n} == {
            f"bitsandbytes/libbitsandbytes_{v}.so" for v in kept
        }
        assert (
            z.read("bitsandbytes/libbitsandbytes_cuda130.so")
            == libs["bitsandbytes/libbitsandbytes_cuda130.so"]
        )
        lines = z.read(f"{info}/RECORD").decode().splitlines()
        assert len(lines) == len(names) and all(line.split(",")[0] in names for line in lines)
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
         "--target", str(target), str(wheel)],
        check=True, timeout=120,
    )  # fmt: skip
    installed = {p.name for p in (target / "bitsandbytes").glob("*.so")}
    assert installed == {f"libbitsandbytes_{v}.so" for v in kept}


def test_pinned_versions_read_constraints_by_normalised_name(tmp_path) -> None:
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("# header\nOpen_Clip.Torch==3.3.0\ntorch==2.15.0 ; python_version>'3'\n")
    pins = gpu_wheels.pinned_versions(constraints)
    assert pins == {"open-clip-torch": "3.3.0", "torch": "2.15.0"}
    assert gpu_wheels.same_name("open_clip_torch", "Open-Clip.Torch")
