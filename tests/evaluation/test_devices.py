"""Where sampling and evaluation run: `auto`, checked device names, precision -> dtype."""

from __future__ import annotations

import pytest
import torch

from pebr_lightning.errors import PebrError
from pebr_lightning.evaluation.devices import precision_dtype, resolve_device, resolve_dtype

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")


def test_auto_is_the_gpu_when_there_is_one_else_the_cpu_in_float32():
    device = resolve_device("auto")
    assert device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        assert resolve_dtype("auto", device) == "float32"
        assert resolve_dtype("auto", "auto") == "float32"


@NO_CUDA
@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_a_one_line_error(name):
    with pytest.raises(PebrError) as caught:
        resolve_device(name)
    message = str(caught.value)
    assert message.startswith(f"--device: {name} needs a CUDA device and none is available here")
    assert "use cpu, or auto" in message and "\n" not in message


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("gpu", r"--device: 'gpu' is not a torch device \(expected auto, cpu, cuda"),
        ("cuda:x", r"--device: 'cuda:x' is not a torch device"),
        ("meta", r"--device: 'meta' is not a device a model can run on here"),
        ("cpu:3", r"--device: cpu:3 names device 3, but 1 cpu device is visible"),
    ],
)
def test_bad_device_names_say_what_is_wrong(name, message):
    with pytest.raises(PebrError, match=message):
        resolve_device(name)
    with pytest.raises(PebrError, match=r"^schedule.yaml: field 'device': "):
        resolve_device(name, "schedule.yaml: field 'device'")


@pytest.mark.parametrize(
    ("precision", "dtype"),
    [
        ("bf16-mixed", "bfloat16"),
        ("bf16-true", "bfloat16"),
        ("bf16", "bfloat16"),
        ("transformer-engine", "bfloat16"),
        ("16-mixed", "float16"),
        ("16-true", "float16"),
        (16, "float16"),
        ("32-true", "float32"),
        (32, "float32"),
        ("64-true", "float32"),
    ],
)
def test_training_precision_maps_to_a_weight_dtype(precision, dtype):
    assert precision_dtype(precision) == dtype


def test_auto_dtype_on_cuda_follows_the_training_precision():
    """No GPU needed: the device is named, and bf16 support is given."""
    assert resolve_dtype("auto", "cuda", "bf16-true", bf16_supported=True) == "bfloat16"
    assert resolve_dtype("auto", "cuda:1", "16-mixed", bf16_supported=True) == "float16"
    assert resolve_dtype("auto", "cuda", "32-true", bf16_supported=True) == "float32"
    assert resolve_dtype("auto", "cuda", None, bf16_supported=True) == "bfloat16"
    # a GPU without bfloat16 runs bf16-trained weights in float32
    assert resolve_dtype("auto", "cuda", "bf16-mixed", bf16_supported=False) == "float32"
    assert resolve_dtype("auto", "cuda", None, bf16_supported=False) == "float32"
    # the CPU stays float32 whatever the training precision; a named dtype always wins
    assert resolve_dtype("auto", "cpu", "bf16-true", bf16_supported=True) == "float32"
    assert resolve_dtype("float16", "cpu") == "float16"
    assert resolve_dtype("float32", "cuda", "bf16-true", bf16_supported=True) == "float32"
    with pytest.raises(PebrError, match="'fp8' is not one of auto, float32, bfloat16, float16"):
        resolve_dtype("fp8", "cpu")
