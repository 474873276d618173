"""Images as a person sees them, within a memory budget, in the formats a VLM reads.

Real files crafted with Pillow: phone JPEGs with EXIF orientation tags, the same
bytes inside a Parquet table, an EPS file, a 10000 x 10 strip, a 40-megapixel
16-bit PNG measured in a separate process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pebr_lightning.data.images import load_image
from pebr_lightning.data.manifest import load_manifest
from pebr_lightning.errors import ManifestError


def phone_photo(path: Path, orientation: int) -> Path:
    """A 128 x 96 picture stored as the sensor saw it, red in its top-left corner, with
    the EXIF orientation tag a phone writes (6: the camera was turned 90 degrees)."""
    image = Image.new("RGB", (128, 96), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 32, 32))
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, exif=exif.tobytes(), quality=95)
    return path


def red(pixel: tuple[int, int, int]) -> bool:
    return pixel[0] > 200 and pixel[2] < 60


def test_a_sideways_phone_photo_loads_upright(tmp_path) -> None:
    # orientation 6: display = stored turned 90 degrees clockwise, so 96 wide, 128 high,
    # and the stored top-left corner ends at the top right
    upright = load_image(phone_photo(tmp_path / "six.jpg", 6))
    assert upright.size == (96, 128)
    assert red(upright.getpixel((90, 5))) and not red(upright.getpixel((5, 5)))


def test_an_upside_down_phone_photo_loads_upright(tmp_path) -> None:
    turned = load_image(phone_photo(tmp_path / "three.jpg", 3))
    assert turned.size == (128, 96)
    assert red(turned.getpixel((122, 90))) and not red(turned.getpixel((5, 5)))


def test_an_untagged_photo_is_left_as_stored(tmp_path) -> None:
    plain = load_image(phone_photo(tmp_path / "one.jpg", 1))
    assert plain.size == (128, 96) and red(plain.getpixel((5, 5)))


def test_parquet_image_bytes_keep_their_orientation(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = phone_photo(tmp_path / "six.jpg", 6).read_bytes()
    table = pa.table(
        {
            "id": ["p0"],
            "image": [{"bytes": data, "path": None}],
            "question": ["What colour is the top-right corner?"],
            "answer": ["red"],
        }
    )
    pq.write_table(table, tmp_path / "t.parquet")
    (record,) = load_manifest(tmp_path / "t.parquet").records
    upright = load_image(record["image"])
    assert upright.size == (96, 128) and red(upright.getpixel((90, 5)))


def test_an_eps_file_is_not_handed_to_ghostscript(tmp_path) -> None:
    eps = tmp_path / "figure.png"  # the name says PNG; the bytes are PostScript
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n%%EOF\n")
    with pytest.raises(ManifestError, match=r"cannot read image .*figure\.png") as info:
        load_image(eps)
    assert "Ghostscript" not in str(info.value)  # never identified as EPS


def test_a_long_thin_strip_is_refused_at_validation_naming_line_and_id(tmp_path) -> None:
    Image.new("RGB", (10000, 10), (0, 0, 0)).save(tmp_path / "strip.png")
    record = {"id": "strip-1", "image": "strip.png", "question": "q", "answer": "1"}
    (tmp_path / "m.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(ManifestError) as info:
        load_manifest(tmp_path / "m.jsonl")
    message = str(info.value)
    assert "m.jsonl:1" in message and "strip-1" in message
    assert "10000 x 10: its aspect ratio is over 200" in message
    with pytest.raises(ManifestError, match="aspect ratio is over 200"):
        load_image(tmp_path / "strip.png")


def test_a_32_bit_image_counts_its_wider_pixels_against_the_limit(tmp_path, monkeypatch) -> None:
    import numpy as np

    Image.fromarray(np.zeros((100, 100), dtype=np.float32), mode="F").save(tmp_path / "f.tiff")
    Image.new("RGB", (100, 100)).save(tmp_path / "rgb.png")
    monkeypatch.setenv("PEBR_MAX_IMAGE_PIXELS", "12000")
    assert load_image(tmp_path / "rgb.png").size == (100, 100)  # 10,000 RGB pixels
    with pytest.raises(ManifestError, match="over the limit of 12,000"):
        load_image(tmp_path / "f.tiff")  # 4 bytes a pixel: counts as 13,333


MEASURE = """
import resource, sys
from pebr_lightning.data.images import load_image
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
image = load_image(sys.argv[1])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(image.size[0], image.size[1], (after - before) // 1024)
"""


def test_a_40_megapixel_16_bit_png_loads_within_a_bounded_memory(tmp_path) -> None:
    """Scaled through a float64 copy it cost 8 bytes a pixel more: 887 MB here."""
    import numpy as np

    pixels = np.zeros((6300, 6300), dtype=np.uint16)
    pixels[:, ::7] = 40000
    Image.fromarray(pixels).save(tmp_path / "wide.png", compress_level=1)
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(tmp_path / "wide.png")],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    width, height, grown_mb = map(int, done.stdout.split())
    assert (width, height) == (6300, 6300)
    assert grown_mb < 400, grown_mb  # measured: 887 MB through float64, 185 MB now
