"""Model families: what differs between VLM architectures, each family in one module.

`family_of(config)` picks the family of a transformers config by its `model_type`,
through the `pebr_lightning.families` entry-point group (qwen_vl.py: Qwen2-VL,
Qwen2.5-VL, Qwen3-VL; gemma3.py: Gemma 3). Everything family-specific the HF engine,
the trainer's log-probs, the collators and the vLLM request mapping need goes
through the `ModelFamily` it returns (base.py).
"""

from pebr_lightning.models.families.base import (
    GROUP,
    ModelFamily,
    family_of,
    registered_families,
)

__all__ = ["GROUP", "ModelFamily", "family_of", "registered_families"]
