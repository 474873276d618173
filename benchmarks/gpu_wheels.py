"""Download the wheels the GPU machine lacks into .whl/, for benchmarks/gpu_check.sh.

    make gpu-wheels          # = python benchmarks/gpu_wheels.py

The lent GPU machine (one H200, Python 3.12, no network) has torch, lightning,
torchmetrics, accelerate and an older transformers and peft, but not bitsandbytes,
open_clip_torch, nltk, jsonargparse, mathruler or trl. Everything a call carries there
(the working tree plus these wheels) must fit in 64 MiB, and bitsandbytes alone is
41 MiB because it ships a library for every CUDA and ROCm release; its wheel is
rewritten with only the CPU and CUDA 13 libraries (the machine's torch is built for
CUDA 13), which brings it to about 3 MiB. Versions come from constraints.txt, so the
GPU check runs what the tests ran here. The total is checked against the budget;
optional wheels (trl and its datasets stack, for benchmarks/grpo_vs_trl.py) are
left out, with a message, if they do not fit.

Only what this list names, at the pinned version, stays in the folder (any other wheel
is removed), and .whl/MANIFEST.json records each wheel's sha256. gpu_check.sh installs
exactly the wheels the manifest lists, each checked against its hash:

    python benchmarks/gpu_wheels.py --verify .whl   # the verified wheel paths, or exit 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MANIFEST = "MANIFEST.json"
BUDGET_BYTES = 64 * 2**20  # what one device call may carry: working tree + wheels
# (distribution, needed for); "optional" ones are dropped first when over budget.
NEEDED = [
    ("bitsandbytes", "4-bit QLoRA"),
    ("transformers", "the pinned version (the image has an older one)"),
    ("peft", "the pinned version"),
    ("regex", "transformers needs a newer one than some images have"),
    ("open_clip_torch", "the clip_score reward"),
    ("ftfy", "open_clip_torch"),
    ("wcwidth", "ftfy"),
    ("nltk", "the keyword reward's normalised mode"),
    ("jsonargparse", "LightningCLI (pebr fit)"),
    ("docstring_parser", "jsonargparse[signatures]"),
    ("typeshed_client", "jsonargparse[signatures]"),
    ("mathruler", "the accuracy reward"),
    ("pylatexenc", "mathruler"),
]
OPTIONAL = [
    ("trl", "benchmarks/grpo_vs_trl.py"),
    ("datasets", "trl"),
    ("dill", "datasets"),
    ("multiprocess", "datasets"),
    ("fsspec", "datasets"),
]
PLATFORMS = [
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--dest", default=str(REPO / ".whl"), help="wheel folder (git-ignored)")
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python")
    parser.add_argument(
        "--keep-libs",
        default="cpu,cuda13",
        help="bitsandbytes libraries to keep, by name prefix after libbitsandbytes_",
    )
    parser.add_argument("--no-optional", action="store_true", help="leave out trl and its stack")
    parser.add_argument(
        "--verify", metavar="DIR", help="check DIR against its manifest; print the wheels"
    )
    args = parser.parse_args(argv)
    if args.verify:
        return verify_command(Path(args.verify))
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    # gpu_check.sh installs the wheels only under this Python (a dry run elsewhere does not)
    (dest / "PYTHON_VERSION").write_text(args.python_version + "\n")
    pins = pinned_versions(REPO / "constraints.txt")
    wanted = NEEDED + ([] if args.no_optional else OPTIONAL)
    for stale in stale_wheels(dest, [n for n, _ in wanted], pins):
        print(f"removed {stale.name}: not a wanted wheel at its pinned version")
        stale.unlink()
    for name, _ in wanted:
        if not any(same_name(name, w.name.split("-")[0]) for w in dest.glob("*.whl")):
            fetch(name, pins, dest, args.python_version)
    for wheel in dest.glob("bitsandbytes-*.whl"):
        before = wheel.stat().st_size
        slim_wheel(wheel, tuple(args.keep_libs.split(",")))
        print(f"{wheel.name}: {before / 2**20:.1f} -> {wheel.stat().st_size / 2**20:.1f} MiB")
    tree = tree_bytes(REPO)
    optional = {n for n, _ in OPTIONAL}
    if tree + folder_bytes(dest) > BUDGET_BYTES:
        for wheel in sorted(dest.glob("*.whl")):
            if any(same_name(n, wheel.name.split("-")[0]) for n in optional):
                wheel.unlink()
        print("over the budget: the optional trl wheels were removed (grpo_vs_trl is skipped)")
    write_manifest(dest)
    total = tree + folder_bytes(dest)
    print(table(dest, tree))
    if total > BUDGET_BYTES:
        print(
            f"error: {total / 2**20:.1f} MiB is over the {BUDGET_BYTES / 2**20:.0f} MiB a device "
            "call carries; remove wheels from .whl or ignore large untracked files",
            file=sys.stderr,
        )
        return 1
    return 0


def wheel_name_version(wheel: Path) -> tuple[str, str]:
    """(distribution, version) from a wheel's file name (PEP 427)."""
    parts = wheel.name.split("-")
    return parts[0], parts[1] if len(parts) > 1 else ""


def stale_wheels(dest: Path, wanted: list[str], pins: dict[str, str]) -> list[Path]:
    """Wheels in `dest` that are not one of `wanted` at its pinned version: a wheel
    left from an older pin, or one nobody asked for, is not carried."""
    stale = []
    for wheel in sorted(dest.glob("*.whl")):
        name, version = wheel_name_version(wheel)
        key = re.sub(r"[-_.]+", "-", name).lower()
        if not any(same_name(name, w) for w in wanted) or pins.get(key) != version:
            stale.append(wheel)
    return stale


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(dest: Path) -> Path:
    """dest/MANIFEST.json: every wheel in `dest` with its sha256."""
    wheels = [{"file": w.name, "sha256": sha256(w)} for w in sorted(dest.glob("*.whl"))]
    path = dest / MANIFEST
    path.write_text(json.dumps({"wheels": wheels}, indent=1) + "\n")
    return path


def verify(dest: Path) -> tuple[list[Path], list[str]]:
    """(the manifest's wheels, problems): every wheel in `dest` must be listed, every
    listed one present with its recorded sha256."""
    present = sorted(dest.glob("*.whl"))
    manifest = dest / MANIFEST
    if not manifest.is_file():
        missing = f"{manifest} is missing: rebuild the folder with `make gpu-wheels`"
        return [], [missing] if present else []
    try:
        listed = {e["file"]: e["sha256"] for e in json.loads(manifest.read_text())["wheels"]}
    except (ValueError, KeyError, TypeError) as err:
        return [], [f"{manifest} is not a wheel manifest ({err})"]
    problems = [
        f"{wheel} is not in {manifest}: remove it (or rebuild with `make gpu-wheels`)"
        for wheel in present
        if wheel.name not in listed
    ]
    good = []
    for name, digest in listed.items():
        wheel = dest / name
        if "/" in name or not wheel.is_file():
            problems.append(f"{dest / name} is listed in {manifest} but missing")
        elif sha256(wheel) != digest:
            problems.append(f"{wheel} does not match its sha256 in {manifest}: changed since")
        else:
            good.append(wheel)
    return good, problems


def verify_command(dest: Path) -> int:
    good, problems = verify(dest)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        return 1
    print("\n".join(str(w) for w in good))
    return 0


def same_name(a: str, b: str) -> bool:
    """Distribution names compare equal across -, _ and . and case (PEP 503)."""
    return re.sub(r"[-_.]+", "-", a).lower() == re.sub(r"[-_.]+", "-", b).lower()


def pinned_versions(constraints: Path) -> dict[str, str]:
    pins = {}
    for line in constraints.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line.strip())
        if match:
            pins[re.sub(r"[-_.]+", "-", match[1]).lower()] = match[2]
    return pins


def fetch(name: str, pins: dict[str, str], dest: Path, python_version: str) -> None:
    """One wheel for the GPU machine's platform; built here when only an sdist exists."""
    key = re.sub(r"[-_.]+", "-", name).lower()
    if key not in pins:
        raise SystemExit(f"error: {name} is not pinned in constraints.txt; run `make lock`")
    spec = f"{name}=={pins[key]}"
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    download = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
    got = subprocess.run(
        [*download, "--only-binary=:all:", "--python-version", python_version,
         "--implementation", "cp", *platforms, "-d", str(dest), spec],
        capture_output=True, text=True,
    )  # fmt: skip
    if got.returncode != 0:  # e.g. pylatexenc: source only, pure Python, so build it here
        built = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(dest), spec],
            capture_output=True,
            text=True,
        )
        if built.returncode != 0:
            raise SystemExit(f"error: no wheel for {spec}:\n{got.stderr}\n{built.stderr}")


def slim_wheel(wheel: Path, keep: tuple[str, ...]) -> None:
    """Rewrite `wheel` without the bitsandbytes native libraries not named in `keep`.

    The wheel's RECORD loses the lines of the dropped files, so pip installs it as a
    valid wheel; every other member is copied byte for byte.
    """
    library = re.compile(r"(^|/)libbitsandbytes_(\w+?)\.(so|dll|dylib)$")

    def dropped(member: str) -> bool:
        match = library.search(member)
        return match is not None and not match[2].startswith(keep)

    with zipfile.ZipFile(wheel) as source:
        members = source.infolist()
        if not any(dropped(m.filename) for m in members):
            return
        partial = wheel.with_suffix(".partial")
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as target:
            for member in members:
                if dropped(member.filename):
                    continue
                data = source.read(member)
                if member.filename.endswith(".dist-info/RECORD"):
                    lines = data.decode().splitlines()
                    data = "".join(
                        f"{line}\n" for line in lines if not dropped(line.split(",", 1)[0])
                    ).encode()
                target.writestr(member, data)
    partial.replace(wheel)


def tree_bytes(repo: Path) -> int:
    """Bytes of what a device call sends: tracked and untracked-not-ignored files."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    return sum(
        (repo / p.decode()).stat().st_size for p in listed if p and (repo / p.decode()).is_file()
    )


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def table(dest: Path, tree: int) -> str:
    lines = ["| carried | MiB |", "|---|---|", f"| working tree | {tree / 2**20:.2f} |"]
    for wheel in sorted(dest.glob("*.whl")):
        lines.append(f"| {wheel.name} | {wheel.stat().st_size / 2**20:.2f} |")
    total = tree + folder_bytes(dest)
    lines.append(f"| total (budget {BUDGET_BYTES / 2**20:.0f}) | {total / 2**20:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
