"""Build a policy: load a VLM checkpoint + processor, quantize, freeze, wrap with LoRA.

Builders take plain values (a name or path, small config dataclasses) so that the
LightningModules never read YAML. Supported: every model family registered in
`pebr_lightning.families` (models/families/: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Gemma 3),
through `AutoModelForImageTextToText` (a local folder or a hub id), plus
names registered in the `pebr_lightning.models` entry-point group, such as the demo's
`tiny-qwen2.5-vl` (pebr_demo/models/tiny.py), which resolve to a folder and then load
exactly like a real checkpoint.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from pebr_lightning import entry_points
from pebr_lightning.errors import PebrError, load_failure_reason
from pebr_lightning.models.families import family_of
from pebr_lightning.models.finite import refuse_nonfinite

# LoRA targets by default: the language model's attention and MLP projections.
# The vision tower (Qwen's `visual`) has layers with the same names (Qwen2.5-VL's vision MLP
# is gate/up/down too), so the pattern is anchored on `language_model`.
LANGUAGE_PROJECTIONS = (
    r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
)


@dataclass
class LoraConfig:
    """LoRA adapter settings (PEFT)."""

    r: int = 16
    """Rank of the low-rank update."""
    alpha: int = 32
    """Scaling numerator: the update is multiplied by alpha / r."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: str | list[str] = LANGUAGE_PROJECTIONS
    """Module names (list) or a regex matched against full module names (str)."""

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise PebrError(f"lora.r must be positive, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise PebrError(f"lora.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class QuantizationConfig:
    """bitsandbytes k-bit loading of the language model (QLoRA)."""

    bits: Literal[4, 8] = 4
    """4 (NF4/FP4) or 8 (LLM.int8)."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type."""
    double_quant: bool = True
    """Quantize the quantization constants too (saves ~0.4 bit per parameter)."""
    compute_dtype: str = "bfloat16"
    """dtype of the matmuls on dequantized weights."""
    quantize_vision: bool = False
    """Also quantize the vision tower (left in full precision by default)."""
    skip_modules: list[str] = field(default_factory=lambda: ["lm_head"])
    """Extra module names kept unquantized."""


@dataclass
class Policy:
    """A loaded policy model and its processor."""

    model: nn.Module
    processor: Any
    name_or_path: str


@dataclass(frozen=True)
class PolicySpec:
    """Which policy a stage trains and how it is loaded: built once from a module's
    settings, read by SFT, GRPO and `pebr export` alike, and stored in checkpoints
    by value (`pebr_policy`), so nothing reads these settings by attribute name."""

    model: str = "tiny-qwen2.5-vl"
    """`tiny-qwen2.5-vl`, a local folder (a LoRA `.hf` one loads its base) or a hub id."""
    lora: LoraConfig | None = None
    """LoRA adapter settings; None trains every weight."""
    quantization: QuantizationConfig | None = None
    """k-bit loading of the language model (QLoRA); None loads it unquantized."""
    freeze_vision: bool | None = None
    """Keep the vision tower's weights fixed; None: the module's default (SFT: frozen,
    as the paper's SFT; GRPO: trained, as the paper's RL), set by `with_default`."""
    dtype: str | None = None
    """Weight dtype name; None keeps the checkpoint's own."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, more time)."""
    trust_remote_code: bool = False
    """Allow a hub model's own Python code to run."""

    def __post_init__(self) -> None:
        # blocks given as mappings (Python callers, checkpoints saved as plain data)
        for name, cls in (("lora", LoraConfig), ("quantization", QuantizationConfig)):
            value = getattr(self, name)
            if isinstance(value, dict):
                object.__setattr__(self, name, cls(**value))
        if not isinstance(self.model, str) or not self.model:
            raise PebrError(
                f"policy.model must be a model name, folder or hub id, got {self.model!r}"
            )

    @classmethod
    def parse(cls, value: Any) -> PolicySpec:
        """A spec, or a mapping of its fields (Python callers, plain-data checkpoints)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = sorted(set(value) - {f.name for f in fields(cls)})
            if unknown:
                known = ", ".join(f.name for f in fields(cls))
                raise PebrError(f"policy has unknown key(s) {unknown}; its keys: {known}")
            return cls(**value)
        raise PebrError(f"policy must be a mapping of {cls.__name__} fields, got {value!r}")

    def with_default(self, freeze_vision: bool) -> PolicySpec:
        """This spec with `freeze_vision` set to the module's default where unset."""
        if self.freeze_vision is not None:
            return self
        return replace(self, freeze_vision=freeze_vision)

    def build(self, **overrides: Any) -> Policy:
        """`build_policy` with these settings (`overrides` replace some, e.g. export
        loads unquantized in its own dtype); an unset freeze_vision freezes."""
        settings = {**self.settings(), **overrides}
        if settings["freeze_vision"] is None:
            settings["freeze_vision"] = True
        return build_policy(settings.pop("model"), **settings)

    def processor(self) -> Any:
        """The model's processor alone (what a module needs before its weights load)."""
        return load_processor(self.model, self.trust_remote_code)

    def folder(self) -> str:
        """The model as a local folder or hub id (embedded names are built first); an
        adapter folder stands for its base model with the adapter merged in."""
        return resolve_model_path(self.model)

    def settings(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to_dict(self) -> dict[str, Any]:
        """Plain values (for a checkpoint): the config blocks as mappings."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PolicySpec:
        lora, quant = data.get("lora"), data.get("quantization")
        return cls(
            **{
                **data,
                "lora": LoraConfig(**lora) if isinstance(lora, dict) else lora,
                "quantization": QuantizationConfig(**quant) if isinstance(quant, dict) else quant,
            }
        )


def resolve_model_path(name_or_path: str) -> str:
    """A local folder for registered names and existing paths, otherwise the hub id
    unchanged. A registered name (entry-point group `pebr_lightning.models`) is asked
    for its folder, which it may build on first use.

    Every loader goes through here, so a path that is not there fails with one plain
    message instead of transformers' advice on the form of hub ids.
    """
    if name_or_path in entry_points.names(entry_points.MODELS):
        make = entry_points.load(entry_points.MODELS, name_or_path, "model")
        return str(make(name_or_path))
    check_model_folder(name_or_path)
    return os.path.expanduser(name_or_path)  # transformers does not expand `~`


def check_model_folder(name_or_path: str, what: str = "model") -> None:
    """Raise PebrError when `name_or_path` means a local folder that is not there.

    What counts as meant to be local: it starts with `.`, `/` or `~`, has more than one
    `/` (or any other path separator), ends in `.hf` or `.ckpt`, or its first part is a
    local folder (`runs/x` from a folder holding `runs/`). Anything else, a plain
    `org/name`, is left to the hub.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir() or not _looks_local(name_or_path):
        return
    if path.exists():
        hint = " (`pebr export` turns a .ckpt into one)" if path.suffix == ".ckpt" else ""
        raise PebrError(f"{what} {name_or_path}: is a file, not a model folder{hint}")
    where = "" if path.is_absolute() else f" (relative to {os.getcwd()})"
    raise PebrError(f"{what} folder {name_or_path} does not exist{where}")


def load_processor(name_or_path: str, trust_remote_code: bool = False):
    """The processor (tokenizer + image processor + chat template) of a checkpoint."""
    from transformers import AutoProcessor

    path = resolve_model_path(name_or_path)
    try:
        processor = AutoProcessor.from_pretrained(path, **_load_kwargs(path, trust_remote_code))
    except OSError as err:
        raise PebrError(f"cannot load the processor of {name_or_path!r}: {err}") from err
    # Training batches pad on the right; generation switches to left padding itself.
    processor.tokenizer.padding_side = "right"
    return processor


def build_policy(
    name_or_path: str,
    lora: LoraConfig | None = None,
    quantization: QuantizationConfig | None = None,
    freeze_vision: bool = True,
    dtype: str | None = None,
    gradient_checkpointing: bool = False,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> Policy:
    """Load a VLM checkpoint and its processor, ready to train.

    Args:
        name_or_path: `tiny-qwen2.5-vl`, a local checkpoint folder or a hub id. A
            folder holding a PEFT adapter (an `.hf` folder of a LoRA run) loads its
            base model, merges the adapter in, and then applies `lora` afresh: how a
            stage starts from the previous stage's LoRA result.
        lora: wrap with a PEFT LoRA adapter (language-model projections by default);
            None trains the unfrozen weights directly.
        quantization: load the language model in 4/8-bit through bitsandbytes.
        freeze_vision: freeze the vision tower and its projector (the paper's SFT).
        dtype: weight dtype name ("bfloat16", "float32", ...); None keeps float32.
        gradient_checkpointing: recompute activations in backward to save memory.
        trust_remote_code: allow a checkpoint's own Python code to run (off unless set).
        attn_implementation: e.g. "sdpa", "flash_attention_2"; None is transformers' choice.
    """
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    if quantization is not None and lora is None:
        raise PebrError(
            "quantization needs a lora block: 4/8-bit weights cannot be trained directly "
            "(set model.policy.lora, or quantization: null for full fine-tuning)"
        )
    path = resolve_model_path(name_or_path)
    kwargs = _load_kwargs(path, trust_remote_code)
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if quantization is not None:
        skip = list(quantization.skip_modules)
        if not quantization.quantize_vision:
            # transformers matches skip patterns from the start of the full module name
            # ("model.visual.blocks.0..."), as a regex ending on a module boundary.
            skip += [f".*{name}" for name in family_at(path, trust_remote_code).vision_modules]
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=quantization.bits == 4,
            load_in_8bit=quantization.bits == 8,
            bnb_4bit_quant_type=quantization.quant_type,
            bnb_4bit_use_double_quant=quantization.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, quantization.compute_dtype),
            llm_int8_skip_modules=skip,
        )
    adapter = adapter_base(path)
    try:
        model = AutoModelForImageTextToText.from_pretrained(adapter or path, **kwargs)
    except (OSError, ValueError) as err:
        raise PebrError(f"cannot load model {adapter or name_or_path!r}: {err}") from err
    if adapter is not None:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, path).merge_and_unload()
        except (pickle.UnpicklingError, RuntimeError, OSError, ValueError) as err:
            # peft reads an adapter_model.bin with torch.load(weights_only=True); say why
            # it was refused without torch's advice to retry unsafely
            raise PebrError(
                f"cannot load the adapter in {path}: {load_failure_reason(err)}; only "
                "adapter_model.safetensors, or a .bin of plain tensors, is read"
            ) from None
    refuse_nonfinite(model.named_parameters(), f"model {name_or_path}")
    processor = load_processor(name_or_path, trust_remote_code)

    if quantization is not None:
        # What peft's prepare_model_for_kbit_training does, minus its cast of every
        # unquantized weight to float32: for a 7B model the vision tower, embeddings and
        # LM head (~1.8B weights) would take ~7 GB of a 24 GB card, for frozen weights.
        model.requires_grad_(False)
        for module in model.modules():
            # bitsandbytes repacks a 4-bit weight for inference the first time it runs
            # without gradients on a CPU with AVX512-BF16 (rollouts, validation), and the
            # next training step then fails; GPUs never take that path.
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if freeze_vision:
        for _, param in vision_parameters(model):
            param.requires_grad_(False)
    if lora is not None:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        peft_config = PeftLoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, peft_config)
        # get_peft_model freezes every base weight; the vision tower was frozen above
        # already, and anything else the user wants trained goes through LoRA.
    return Policy(model=model, processor=processor, name_or_path=path)


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (LoRA layers stay injected in it)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def vision_modules(model: nn.Module) -> list[nn.Module]:
    """The vision tower and its projector (the model family's `vision_modules`)."""
    base = unwrap(model)
    found = (getattr(base.model, name, None) for name in family_of(base.config).vision_modules)
    return [module for module in found if module is not None]


def vision_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The weights of the vision modules, by name within them."""
    return [item for module in vision_modules(model) for item in module.named_parameters()]


def vision_trainable(policy: nn.Module) -> bool:
    """Whether any weight of the vision tower trains (then its features need gradients)."""
    return any(p.requires_grad for _, p in vision_parameters(policy))


def adapter_free_vision(policy: nn.Module) -> bool:
    """Whether the vision tower's output is the same with the adapter off."""
    return not any("lora_" in n for n, _ in vision_parameters(policy))


def adapter_base(path: str) -> str | None:
    """The base model of a PEFT adapter folder; None when `path` is not one."""
    config = Path(path) / "adapter_config.json"
    if not config.is_file():
        return None
    try:
        base = json.loads(config.read_text())["base_model_name_or_path"]
    except (OSError, ValueError, KeyError) as err:
        raise PebrError(f"{config}: cannot read field 'base_model_name_or_path': {err}") from None
    return resolve_model_path(base)


def _looks_local(name: str) -> bool:
    if name.startswith((".", "/", "~")) or name.endswith((".hf", ".ckpt")):
        return True
    if os.sep != "/" and os.sep in name:
        return True
    parts = name.split("/")
    return len(parts) > 2 or (len(parts) == 2 and os.path.isdir(parts[0]))


def family_at(name_or_path: str, trust_remote_code: bool = False) -> Any:
    """The model family of a checkpoint (a registered name, a folder or a hub id), from
    its config alone."""
    from transformers import AutoConfig

    path = resolve_model_path(name_or_path)
    path = adapter_base(path) or path  # a LoRA folder: its base model's config
    return family_of(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code))


def _load_kwargs(path: str, trust_remote_code: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    # A local folder never needs the hub: don't let transformers try it (and wait on
    # retries when offline).
    if os.path.isdir(path) or Path(path).is_absolute():
        kwargs["local_files_only"] = True
    return kwargs


def position_limit(
    name_or_path: str, trust_remote_code: bool = False, model: nn.Module | None = None
) -> int | None:
    """The text model's max_position_embeddings (from `model` if loaded, else its config);
    None when it cannot be read."""
    try:
        if model is not None:
            config = model.config
        else:
            from transformers import AutoConfig

            path = resolve_model_path(name_or_path)
            config = AutoConfig.from_pretrained(
                adapter_base(path) or path, trust_remote_code=trust_remote_code
            )
        value = getattr(config.get_text_config(), "max_position_embeddings", None)
    except (OSError, ValueError, AttributeError):
        return None
    return int(value) if isinstance(value, int) and value > 0 else None
