"""The GPU check's runner: every measurement a lent GPU session needs, in one budget.

Run it through benchmarks/gpu_check.sh (which installs the carried wheels first).
Sections, in order of importance; each runs as its own process with a time limit
cut to what is left of the whole budget, and one that fails or times out does not
stop the next:

1. environment: GPU, driver, Python and package versions.
2. tests: the suite's `gpu`-marked tests (tests/gpu: GRPO and SFT fits, QLoRA, the
   shared-prompt log-prob equality) on the device.
3. qlora_memory: benchmarks/qlora_memory.py on the Qwen2.5-VL-7B architecture
   (random weights), 4-bit + LoRA, G = 8: peak GiB and seconds per phase.
4. rollout_speed: benchmarks/rollout_speed.py on the same checkpoint, 4-bit and
   bf16: rollout tokens/s against the memory-bandwidth limit.
5. grpo_vs_trl: benchmarks/grpo_vs_trl.py on the medium model, both sides on the
   GPU (only when trl is importable).

Everything printed also goes to OUT/gpu_check.log, and the figures of every section
to OUT/gpu_check.json (OUT: --out, else $OUT, else runs/gpu_check). With
`--device cpu --quick` the same sections run shrunk to toy sizes on the CPU: the
dry run the test suite does so that this script cannot rot between GPU sessions.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "bitsandbytes",
    "lightning",
    "torchmetrics",
    "accelerate",
    "open_clip_torch",
    "jsonargparse",
    "nltk",
    "trl",
    "pebr-lightning",
)


@dataclass
class Section:
    """One measurement: its command, how long it may take, and what it left behind."""

    name: str
    command: list[str]
    cap_s: float
    result: Path | None = None  # JSON figures the command writes
    env: dict[str, str] = field(default_factory=dict)
    needs: str | None = None  # a module that must be importable, else the section is skipped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out or os.environ.get("OUT") or REPO / "runs" / "gpu_check")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir or default_workdir(args.device))
    work.mkdir(parents=True, exist_ok=True)
    log = Tee(out / "gpu_check.log")
    deadline = time.monotonic() + args.budget_s
    register_checkout()
    report: dict = {
        "command": "benchmarks/gpu_check.sh " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "mode": "quick" if args.quick else "full",
        "device": args.device,
        "budget_s": args.budget_s,
        "environment": environment(args.device),
        "sections": {},
    }
    env_line = report["environment"]
    log(f"gpu check ({report['mode']}, {args.device}), {report['date']}")
    log(f"machine: {env_line.get('gpu', 'no GPU')}; python {env_line['python']}")
    log("versions: " + ", ".join(f"{k} {v}" for k, v in env_line["packages"].items()))
    for section in sections(args, out, work):
        left = deadline - time.monotonic()
        report["sections"][section.name] = run_section(section, left, log)
        write_json(out / "gpu_check.json", report)  # after each section: a cut run keeps them
    log("")
    for line in summary(report):
        log(line)
    write_json(out / "gpu_check.json", report)
    if not args.keep_workdir and args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    failed = [n for n, s in report["sections"].items() if s["status"] in ("failed", "timed out")]
    log(f"\nfigures: {out / 'gpu_check.json'}; " + (f"FAILED: {failed}" if failed else "all ran"))
    return 1 if failed else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="shorter runs (about half)")
    parser.add_argument("--out", help="folder for gpu_check.json and the log (default: $OUT)")
    parser.add_argument(
        "--workdir", help="scratch folder (the 7B checkpoint: ~17 GB; default /dev/shm or /tmp)"
    )
    parser.add_argument("--keep-workdir", action="store_true", help="keep the scratch folder")
    parser.add_argument(
        "--budget-s", type=float, default=None, help="whole-run limit (full 480 s, quick 240 s)"
    )
    parser.add_argument(
        "--only", nargs="+", metavar="SECTION", help="run only these sections (by name)"
    )
    args = parser.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 240.0 if args.quick else 480.0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error(
                "--device cuda: no CUDA device is visible (use --device cpu for a dry run)"
            )
    return args


def default_workdir(device: str) -> Path:
    """RAM-backed /dev/shm when it can hold the 7B checkpoint twice over, else /tmp."""
    shm = Path("/dev/shm")
    if device == "cuda" and shm.is_dir() and shutil.disk_usage(shm).free > 40 * 2**30:
        return shm / "pebr-gpu-check"
    return Path("/tmp") / "pebr-gpu-check"


def register_checkout() -> None:
    """Make the checkout's reward entry points visible when the package is not installed.

    On the GPU machine the project runs from the copied working tree (on PYTHONPATH),
    not from an install, so `importlib.metadata` would find none of the built-in
    rewards. A minimal .dist-info with the pyproject's entry points, written into the
    carried-wheel folder, registers them for this process and its children.
    """
    try:
        importlib.metadata.distribution("pebr-lightning")
        return
    except importlib.metadata.PackageNotFoundError:
        pass
    # no carried wheels: a fresh folder (a fixed one, first on the path, would import
    # whatever anyone left there)
    site = Path(os.environ.get("PEBR_GPU_SITE") or tempfile.mkdtemp(prefix="pebr-gpu-site-"))
    write_dist_info(site, REPO / "pyproject.toml")
    for path in (str(site), str(REPO)):
        if path not in sys.path:
            sys.path.insert(0, path)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(site), str(REPO), os.environ.get("PYTHONPATH")) if p
    )
    importlib.invalidate_caches()


def write_dist_info(site: Path, pyproject: Path) -> Path:
    """`site`/pebr_lightning-<version>.dist-info with the pyproject's name, version and
    entry points (what an install would record, minus the file list)."""
    import tomllib

    project = tomllib.loads(pyproject.read_text())["project"]
    info = site / f"pebr_lightning-{project['version']}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
    )
    groups = dict(project.get("entry-points", {}))
    if project.get("scripts"):
        groups["console_scripts"] = project["scripts"]
    lines = []
    for group, entries in groups.items():
        lines.append(f"[{group}]")
        lines += [f"{name} = {target}" for name, target in entries.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return info


def environment(device: str) -> dict:
    """Versions and the device, read in a child process (this one never touches CUDA)."""
    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    found = {"python": sys.version.split()[0], "packages": packages}
    probe = (
        "import json, torch; p = torch.cuda.get_device_properties(0); "
        "print(json.dumps({'gpu': f'{p.name}, {p.total_memory / 2**30:.1f} GiB', "
        "'cuda': torch.version.cuda, 'capability': list(torch.cuda.get_device_capability(0))}))"
    )
    if device == "cuda":
        got = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
        if got.returncode == 0:
            found.update(json.loads(got.stdout))
        smi = shutil.which("nvidia-smi")
        if smi:
            query = "--query-gpu=name,memory.total,driver_version,clocks.max.memory"
            got = subprocess.run(
                [smi, query, "--format=csv,noheader"], capture_output=True, text=True
            )
            found["nvidia_smi"] = got.stdout.strip()
    return found


def sections(args: argparse.Namespace, out: Path, work: Path) -> list[Section]:
    """What to run for this device and mode, each with its time cap."""
    py = sys.executable
    gpu = args.device == "cuda"
    quick = args.quick
    cache = {"PEBR_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1"}
    size = "7b" if gpu else "small"
    checkpoint = str(work / f"qwen2.5-vl-{size}")
    if gpu:
        qlora = ["--steps", "2" if quick else "3", "--max-new-tokens", "128" if quick else "512"]
        rollout = ["--max-new-tokens", "128" if quick else "512"]
        trl = ["--model", "medium", "--steps", "4" if quick else "6"]
    else:  # the dry run: every path, toy sizes
        qlora = ["--steps", "1", "--prompts", "1", "--group-size", "2"]
        qlora += ["--max-new-tokens", "4", "--micro-batch-size", "2"]
        rollout = ["--prompts", "1", "--group-size", "2", "--max-new-tokens", "4"]
        trl = ["--model", "tiny", "--steps", "2", "--prompts", "1", "--group-size", "4"]
        trl += ["--max-new-tokens", "4"]
    bench = REPO / "benchmarks"
    chosen = [
        Section(
            "tests",
            [py, "-m", "pytest", "-m", "gpu", "tests/gpu", "-q", "-p", "no:cacheprovider",
             f"--junitxml={out / 'gpu_tests.xml'}"],
            cap_s=150,
            result=out / "gpu_tests.xml",
            env={**cache, "PEBR_TEST_DEVICE": args.device, "PEBR_TEST_CACHE": cache["PEBR_CACHE"]},
        ),
        Section(
            "qlora_memory",
            [py, str(bench / "qlora_memory.py"), "--size", size, "--device", args.device,
             "--checkpoint", checkpoint, *qlora, "--out", str(work / "qlora_memory.json")],
            cap_s=300,
            result=work / "qlora_memory.json",
            env=cache,
        ),
        Section(
            "rollout_speed",
            [py, str(bench / "rollout_speed.py"), "--size", size, "--device", args.device,
             "--checkpoint", checkpoint, *rollout, "--out", str(work / "rollout_speed.json")],
            cap_s=240,
            result=work / "rollout_speed.json",
            env=cache,
        ),
        Section(
            "grpo_vs_trl",
            [py, str(bench / "grpo_vs_trl.py"), "--device", args.device, *trl,
             "--out", str(work / "grpo_vs_trl.json")],
            cap_s=150,
            result=work / "grpo_vs_trl.json",
            env=cache,
            needs="trl",
        ),
    ]  # fmt: skip
    if args.only:
        unknown = set(args.only) - {s.name for s in chosen}
        if unknown:
            raise SystemExit(f"error: --only: no section named {sorted(unknown)}")
        chosen = [s for s in chosen if s.name in args.only]
    return chosen


MIN_SECONDS = 20.0  # a section is not started with less time than this left


def run_section(section: Section, left: float, log: Tee, min_s: float = MIN_SECONDS) -> dict:
    """Run one section within `left` seconds; its status, seconds, figures and output tail."""
    record: dict = {"command": " ".join(section.command[1:]), "status": "skipped"}
    if section.needs and importlib.util.find_spec(section.needs) is None:
        record["reason"] = f"{section.needs} is not importable (carry its wheel)"
        log(f"\n== {section.name}: skipped, {record['reason']}")
        return record
    if left < min_s:
        record["reason"] = f"budget spent ({left:.0f} s left)"
        log(f"\n== {section.name}: skipped, {record['reason']}")
        return record
    limit = min(section.cap_s, left)
    log(f"\n== {section.name} (limit {limit:.0f} s): {record['command']}")
    if section.result is not None and section.result.exists():
        section.result.unlink()  # figures from an earlier run must not pass as this one's
    started = time.monotonic()
    env = {**os.environ, **section.env, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        section.command,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    tail: list[str] = []
    timed_out = False
    try:
        for line in read_lines(proc, started + limit):
            log(f"  {line}")
            tail = [*tail, line][-40:]
    except TimeoutError:
        timed_out = True
        os.killpg(proc.pid, 9)
    rc = proc.wait()
    seconds = time.monotonic() - started
    record.update(
        rc=rc,
        seconds=round(seconds, 1),
        status="timed out" if timed_out else ("ok" if rc == 0 else "failed"),
        tail=tail,
    )
    if section.result is not None and section.result.exists():
        record["figures"] = read_figures(section.result)
    log(f"== {section.name}: {record['status']} in {seconds:.0f} s")
    return record


def read_lines(proc: subprocess.Popen, deadline: float):
    """The process's output lines until it ends; TimeoutError past `deadline`.

    Reads raw chunks, so a progress bar that redraws with carriage returns and no
    newline cannot block the deadline; "\r" ends a line as "\n" does.
    """
    import selectors

    fd = proc.stdout.fileno()
    selector = selectors.DefaultSelector()
    selector.register(fd, selectors.EVENT_READ)
    pending = ""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        if not selector.select(timeout=min(left, 5.0)):
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            if pending:
                yield pending
            return
        pending += chunk.decode(errors="replace").replace("\r", "\n")
        *lines, pending = pending.split("\n")
        yield from (line for line in lines if line.strip())


def read_figures(path: Path) -> dict:
    if path.suffix == ".xml":
        suite = ET.parse(path).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        counts["passed"] = (
            counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        )
        counts["cases"] = {
            f"{case.get('classname')}::{case.get('name')}": (
                "failed"
                if case.find("failure") is not None or case.find("error") is not None
                else "skipped"
                if case.find("skipped") is not None
                else "passed"
            )
            for case in suite.iter("testcase")
        }
        return counts
    return json.loads(path.read_text())


def summary(report: dict) -> list[str]:
    """One table row per section with its headline figures."""
    lines = ["| section | status | seconds | figures |", "|---|---|---|---|"]
    for name, s in report["sections"].items():
        figures = headline(name, s.get("figures"))
        lines.append(f"| {name} | {s['status']} | {s.get('seconds', '-')} | {figures} |")
    return lines


def headline(name: str, f: dict | None) -> str:
    if not f:
        return "-"
    if name == "tests":
        return f"{f['passed']} passed, {f['failures'] + f['errors']} failed, {f['skipped']} skipped"
    if name == "qlora_memory":
        o = f["overall"]
        peak = "-" if o["peak_gib"] is None else f"{o['peak_gib']:.2f} GiB"
        return f"peak {peak} in {o['peak_phase']}, step {o['step_seconds']:.2f} s"
    if name == "rollout_speed":
        return "; ".join(
            f"{r['precision']} {r['tokens_per_s']:.0f} tok/s, {r['ratio_of_limit']:.2f} of limit"
            for r in f["precisions"]
        )
    if name == "grpo_vs_trl":
        s = f["sides"]
        return (
            f"ours {s['ours']['samples_per_s']:.2f} vs TRL {s['trl']['samples_per_s']:.2f} "
            f"samples/s ({f['ratio']:.2f}x)"
        )
    return "-"


class Tee:
    """Prints a line and appends it to the log file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.write_text("")

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        with self.path.open("a") as f:
            f.write(line + "\n")


def write_json(path: Path, data: dict) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(data, indent=2) + "\n")
    partial.replace(path)


if __name__ == "__main__":
    sys.exit(main())
