"""A model folder whose chat template never finishes stops `pebr eval` with an error
naming the template, instead of hanging it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

LOOP = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"


def test_a_looping_chat_template_is_stopped_with_a_clear_error(tiny_path, shapes_data, tmp_path):
    """Before: `pebr eval` rendered it for good (10^10 iterations)."""
    model = tmp_path / "model"
    shutil.copytree(tiny_path, model)
    template = model / "chat_template.jinja"
    template.write_text(LOOP + template.read_text())
    pebr = str(Path(sys.executable).with_name("pebr"))
    start = time.monotonic()
    done = subprocess.run(
        [pebr, "eval", "--model", str(model), "--manifest", str(shapes_data["val"]),
         "--out", str(tmp_path / "out"), "--limit", "2", "--no-progress"],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PEBR_TEMPLATE_TIME_LIMIT_S": "2"},
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the model's chat template did not finish in 2 s")
    assert time.monotonic() - start < 120
    assert not (tmp_path / "out" / "metrics.json").exists()
