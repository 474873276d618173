"""Models, synthetic datasets and evaluation metrics are plugins: a package that
registers them under the `pebr_lightning.*` entry-point groups is used by the policy
loader, `pebr data synth` and `pebr eval` with no file of this package naming it. The
package here is installed the way pip leaves one (a real `*.dist-info` on sys.path)."""

from __future__ import annotations

import importlib
import json
import sys
import textwrap
from pathlib import Path

import pytest

from pebr_lightning import entry_points
from pebr_lightning.cli import main as pebr_main
from pebr_lightning.data.manifest import load_manifest
from pebr_lightning.errors import PebrError
from pebr_lightning.models.policy import resolve_model_path

EXTRAS = '''
import json
from pathlib import Path

from pebr_demo.data.synth import SHAPES
from pebr_demo.models.tiny import ensure_tiny_model


def folder(name):
    return ensure_tiny_model("tiny-qwen2.5-vl")


class Stamped:
    """The shapes data, each record stamped with where it came from."""

    splits = {"train": 3}

    def write(self, out_dir, n, seed):
        manifest = SHAPES.write(out_dir, n, seed)
        rows = [json.loads(line) for line in Path(manifest).read_text().splitlines()]
        lines = [json.dumps({**row, "origin": "pebr-extras"}) for row in rows]
        Path(manifest).write_text("\\n".join(lines) + "\\n")
        return manifest

    def written_differently(self, manifest, n, seed):
        return None


STAMPED = Stamped()


def characters(records, texts, correct):
    return {"extras/characters": sum(len(t) for t in texts) / len(texts)}


def steals_accuracy(records, texts, correct):
    return {"accuracy": 1.0}
'''


def install(site: Path, entries: dict[str, dict[str, str]], monkeypatch) -> None:
    """Write the `pebr-extras` distribution with these entry points onto sys.path."""
    site.mkdir(exist_ok=True)
    info = site / "pebr_extras-1.0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pebr-extras\nVersion: 1.0\n")
    text = "".join(
        f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in names.items())
        for group, names in entries.items()
    )
    (info / "entry_points.txt").write_text(text)
    (site / "pebr_extras.py").write_text(textwrap.dedent(EXTRAS))
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()


@pytest.fixture
def extras(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    install(
        tmp_path / "site",
        {
            entry_points.MODELS: {"copycat": "pebr_extras:folder"},
            entry_points.DATASETS: {"stamped": "pebr_extras:STAMPED"},
            entry_points.EVAL_METRICS: {"characters": "pebr_extras:characters"},
        },
        monkeypatch,
    )
    yield
    sys.modules.pop("pebr_extras", None)


def test_the_demo_fills_every_group_through_its_entry_points():
    assert {"tiny-qwen2.5-vl", "tiny-qwen2.5-vl-m"} <= set(entry_points.names(entry_points.MODELS))
    assert entry_points.names(entry_points.CLIP_MODELS) == ["tiny-clip"]
    assert entry_points.names(entry_points.DATASETS) == ["shapes"]
    assert entry_points.names(entry_points.EVAL_METRICS) == ["perception"]


def test_a_registered_model_name_loads_its_folder(extras, tiny_path):
    assert resolve_model_path("copycat") == str(tiny_path)
    assert "copycat" in entry_points.names(entry_points.MODELS)


def test_pebr_data_synth_writes_a_registered_dataset(extras, tmp_path, capsys):
    out = tmp_path / "stamped"
    assert pebr_main(["data", "synth", "--name", "stamped", "--out", str(out), "--n", "3"]) == 0
    records = load_manifest(out / "manifest.jsonl").records
    assert len(records) == 3
    assert {r["origin"] for r in records} == {"pebr-extras"}
    assert f"wrote 3 records to {out / 'manifest.jsonl'}" in capsys.readouterr().out


def test_pebr_eval_reports_every_installed_metric(extras, tiny_path, shapes_data, tmp_path):
    out = tmp_path / "eval"
    argv = ["eval", "--model", str(tiny_path), "--manifest", str(shapes_data["val"])]
    argv += ["--out", str(out), "--limit", "4", "--max-new-tokens", "12", "--no-progress"]
    assert pebr_main(argv) == 0
    saved = json.loads((out / "metrics.json").read_text())
    texts = [json.loads(line)["prediction"] for line in (out / "predictions.jsonl").open()]
    assert len(texts) == 4
    assert saved["extras/characters"] == pytest.approx(sum(map(len, texts)) / 4)
    assert saved["perception/n"] == 4.0  # the demo's metric ran beside it


def test_plugin_mistakes_are_one_error_naming_the_plugin(tmp_path, monkeypatch, capsys):
    install(
        tmp_path / "site",
        {
            entry_points.DATASETS: {"shapes": "pebr_extras:STAMPED"},
            entry_points.EVAL_METRICS: {"thief": "pebr_extras:steals_accuracy"},
            entry_points.MODELS: {"broken": "pebr_extras:no_such_function"},
        },
        monkeypatch,
    )
    try:
        with pytest.raises(PebrError, match=r"unknown synthetic dataset 'shapez' .*: shapes\)"):
            entry_points.load(entry_points.DATASETS, "shapez", "synthetic dataset")
        with pytest.raises(PebrError, match=r"'shapes' is registered more than once .*STAMPED"):
            entry_points.load(entry_points.DATASETS, "shapes", "synthetic dataset")
        with pytest.raises(PebrError, match=r"model 'broken' .*cannot be loaded: AttributeError"):
            resolve_model_path("broken")
        from pebr_lightning.evaluation.greedy import extra_metrics

        with pytest.raises(PebrError, match=r"evaluation metric 'thief': 'accuracy' is already"):
            extra_metrics([{}], ["x"], [True], {"accuracy": 0.0})
    finally:
        sys.modules.pop("pebr_extras", None)
