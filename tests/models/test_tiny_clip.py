"""The embedded CLIP's first build says so and shows its progress; a cached one is silent."""

from __future__ import annotations

import re

from pebr_demo.models import tiny_clip
from pebr_demo.models.tiny_clip import TinyClipRecipe, ensure_tiny_clip


def test_first_build_announces_itself_once_and_a_cached_one_is_silent(tmp_path, monkeypatch, capfd):
    """An empty cache folder and a 3-step recipe (seconds, where the default takes a
    minute): the first use prints one line naming what it builds and where, then a bar
    that ends at 3/3 steps with a rate; the second use returns the same folder and
    prints nothing. Another recipe never lands in the default recipe's folder."""
    monkeypatch.setenv("PEBR_CACHE", str(tmp_path / "cache"))
    recipe = TinyClipRecipe(steps=3, batch_size=4, train_images=8)
    folder = ensure_tiny_clip(recipe)
    err = capfd.readouterr().err
    assert folder.parent == tmp_path / "cache" and (folder / tiny_clip.CONFIG_FILE).is_file()
    assert folder.name != tiny_clip.folder_name(TinyClipRecipe())
    assert tiny_clip.folder_name(TinyClipRecipe()) == f"tiny-clip-r{tiny_clip.RECIPE_VERSION}"
    assert err.count("building the embedded CLIP") == 1
    assert f"tiny-clip: building the embedded CLIP once into {folder} (3 training steps" in err
    assert re.search(r"tiny-clip: 100%\|[^\r\n]*\| 3/3 \[[^\]]*(step/s|s/step)\]", err), err

    assert ensure_tiny_clip(recipe) == folder
    assert capfd.readouterr().err == ""
