"""Turn a training checkpoint of any stage into folders that load without pebr.

    pebr export runs/sft/lightning_logs/version_0/checkpoints/last.ckpt --out export/sft

OUT/adapter/ holds the LoRA adapter in PEFT format plus the processor (LoRA runs
only); OUT/merged/ holds the policy with the adapter merged into its weights plus
the processor: a plain `AutoModelForImageTextToText` folder, which vLLM serves as is.
The checkpoint is a `.ckpt` file or the sharded folder that ModelParallelStrategy
(FSDP2) writes with `save_distributed_checkpoint=True` (torch.distributed.checkpoint
shards + `meta.pt`), read in one process.

Checkpoints are data from elsewhere, so nothing in one is executed: files are read
with `torch.load(weights_only=True)`, allowing only pebr's config dataclasses
(SAFE_GLOBALS), and the module class a checkpoint names is looked up in
ALLOWED_MODULES, never imported from the name. The module is rebuilt from the
checkpoint's hyper-parameters, so its policy (and LoRA layout) is the one trained.

A QLoRA run is exported unquantized: the base loads in full precision, in the
dtype `export_dtype` picks, and the adapter is merged into those weights.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pebr_lightning.errors import PebrError, load_failure_reason
from pebr_lightning.files import no_room_error, use_default_modes
from pebr_lightning.models.finite import refuse_nonfinite
from pebr_lightning.models.policy import PolicySpec

# Module classes export rebuilds, by the class path LightningCLI records (`_class_path`).
ALLOWED_MODULES = {
    "pebr_lightning.modules.sft.SFTModule": "sft",
    "pebr_lightning.modules.grpo.GRPOModule": "grpo",
}
DTYPES = ("bfloat16", "float16", "float32")
# Keys LightningCLI adds to the hyper-parameters; not constructor arguments.
CLI_KEYS = ("_class_path", "_instantiator")
META_FILE = "meta.pt"  # lightning.fabric.utilities.load._METADATA_FILENAME
DCP_METADATA = ".metadata"  # written by torch.distributed.checkpoint.save


@dataclass
class Checkpoint:
    """What export needs from a checkpoint file or sharded folder."""

    path: Path
    hyper_parameters: dict[str, Any]
    shapes: dict[str, tuple[int, ...] | None]
    """Name -> shape of every stored module weight (None: stored, but not a tensor)."""
    state_dict: dict[str, Tensor] | None
    """The module's weights of a `.ckpt`; None for a sharded folder (read on load)."""


@dataclass
class ExportResult:
    """The folders written and how."""

    kind: str
    """`sft` or `grpo`."""
    dtype: str
    """dtype of the merged weights."""
    adapter: Path | None
    merged: Path | None
    lora: bool = False
    """The run trained a LoRA adapter (written, and merged into OUT/merged); False for a
    full fine-tune, whose OUT/merged holds the trained weights themselves."""


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    dtype: str | None = None,
    merge: bool = True,
    module: str | None = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> ExportResult:
    """Write OUT/adapter (LoRA runs) and OUT/merged (unless `merge` is False).

    Args:
        checkpoint: a `.ckpt` file or a sharded checkpoint folder.
        out: output folder; must be absent or empty unless `overwrite`.
        dtype: dtype of the merged model; None follows `export_dtype`.
        merge: write OUT/merged; False writes the adapter only (LoRA runs).
        module: `sft` or `grpo` for checkpoints that record no class path.
        overwrite: replace an existing, non-empty `out` (only once the export succeeded).
        trust_remote_code: allow the base model's own Python code to run; required
            when the run had it on.
    """
    path, out = Path(checkpoint), Path(out).resolve()  # resolved: `--out .` has a name
    _check_out(out, overwrite, path)
    if dtype is not None and dtype not in DTYPES:
        raise PebrError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    ckpt = read_checkpoint(path)
    kind = module_kind(ckpt, module)
    lit = build_module(kind, ckpt)
    # The module is rebuilt from the hyper-parameters (the run's config); its
    # PolicySpec is what the checkpoint also records by value (`pebr_policy`).
    spec = lit.policy_spec
    if spec.lora is None and not merge:
        raise PebrError(
            f"{path}: a full fine-tuning checkpoint has no adapter to write; drop --no-merge"
        )
    if spec.trust_remote_code and not trust_remote_code:
        raise PebrError(
            f"{path}: the run set trust_remote_code, so loading its base model runs that "
            "model's own Python code; pass --trust-remote-code if you trust it"
        )
    name = export_dtype(spec, dtype)
    load_trained_policy(lit, spec, ckpt, name, trust_remote_code)

    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    adapter = merged = None
    try:
        tmp.mkdir(parents=True)
        if spec.lora is not None:
            adapter = out / "adapter"
            _save_adapter(lit, spec, tmp / "adapter")
        if merge:
            merged = out / "merged"
            _save_merged(lit, spec, tmp / "merged")
        use_default_modes(tmp)  # safetensors writes 0o600: others could not load the export
        _replace_dir(tmp, out, overwrite)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        full = no_room_error(err, tmp)
        if full is not None and full is not err:
            raise full from err
        raise
    return ExportResult(
        kind=kind, dtype=name, adapter=adapter, merged=merged, lora=spec.lora is not None
    )


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Hyper-parameters and weights (or, for a sharded folder, their names and shapes)."""
    path = Path(path)
    if not path.exists():
        raise PebrError(f"{path}: no such checkpoint file or folder")
    if path.is_dir():
        return _read_sharded(path)
    data = _torch_load(path)
    if not isinstance(data, dict) or not isinstance(data.get("state_dict"), dict):
        raise PebrError(f"{path}: not a Lightning checkpoint (no 'state_dict' in it)")
    state = data["state_dict"]
    shapes = {k: tuple(v.shape) if isinstance(v, Tensor) else None for k, v in state.items()}
    return Checkpoint(path, _hyper_parameters(path, data), shapes, state)


def module_kind(ckpt: Checkpoint, module: str | None = None) -> str:
    """`sft` or `grpo`: the recorded class path if any, else `module`, else a guess.

    The guess: only GRPOModule takes `rewards` (and it requires them).
    """
    if module is not None and module not in ALLOWED_MODULES.values():
        raise PebrError(f"module must be one of {', '.join(ALLOWED_MODULES.values())}")
    recorded = ckpt.hyper_parameters.get("_class_path")
    if recorded is None:
        return module or ("grpo" if "rewards" in ckpt.hyper_parameters else "sft")
    kind = ALLOWED_MODULES.get(recorded) if isinstance(recorded, str) else None
    if kind is None:
        raise PebrError(
            f"{ckpt.path}: the checkpoint names module class {recorded!r}; export only "
            f"rebuilds {' and '.join(ALLOWED_MODULES)}"
        )
    if module is not None and module != kind:
        raise PebrError(f"{ckpt.path}: --module {module} given, but the checkpoint is {recorded}")
    return kind


def build_module(kind: str, ckpt: Checkpoint) -> Any:
    """The LightningModule of `kind`, built from the checkpoint's hyper-parameters.

    Config blocks stored as mappings (LightningCLI runs) become their dataclasses
    again, following the constructor's type hints; stored dataclasses are rebuilt
    so their checks run. The policy itself is not loaded yet.
    """
    cls = _module_class(kind)
    hints = typing.get_type_hints(cls.__init__)
    params = set(hints) - {"return"}
    hparams = {k: v for k, v in ckpt.hyper_parameters.items() if k not in CLI_KEYS}
    hparams = cls.upgrade_hparams(hparams)  # flat keys of checkpoints before 2026-12-06
    unknown = sorted(set(hparams) - params)
    if unknown:
        raise PebrError(
            f"{ckpt.path}: hyper-parameter(s) {', '.join(unknown)} are not arguments of "
            f"{cls.__name__}" + ("" if "_class_path" in ckpt.hyper_parameters else "; --module?")
        )
    from pebr_lightning.rewards.registry import names_not_looked_up

    try:
        # Export runs no reward, so a run's reward plugins need not be installed here.
        with names_not_looked_up():
            return cls(**{k: _as_config(hints[k], v) for k, v in hparams.items()})
    except PebrError as err:
        raise PebrError(f"{ckpt.path}: {err}") from None
    except (TypeError, ValueError) as err:
        raise PebrError(
            f"{ckpt.path}: cannot rebuild {cls.__name__} from its hyper-parameters: {err}"
        ) from None


def export_dtype(spec: PolicySpec, requested: str | None = None) -> str:
    """dtype of the merged weights: `requested`, else the run's `dtype`, else the
    compute dtype of a QLoRA run, else bfloat16 (what serving uses; runs that kept
    float32 weights export smaller and are merged in bfloat16)."""
    name = requested or spec.dtype
    if name is None and spec.quantization is not None:
        name = spec.quantization.compute_dtype
    name = name or "bfloat16"
    if name not in DTYPES:
        raise PebrError(f"cannot export in dtype {name!r}; pass --dtype ({', '.join(DTYPES)})")
    return name


def load_trained_policy(
    module: Any, spec: PolicySpec, ckpt: Checkpoint, dtype: str, trust_remote_code: bool
):
    """Build the module's policy unquantized in `dtype` and load the trained weights.

    With LoRA the checkpoint holds the trainable (adapter) weights only, so they are
    matched by name against the trainable parameters of the freshly built PEFT
    model; otherwise against every weight. Any difference is an error.
    """
    built = spec.build(
        quantization=None,
        dtype=dtype,
        gradient_checkpointing=False,
        trust_remote_code=trust_remote_code,
    )
    module.policy = built.model.eval()
    module.processor = built.processor
    if spec.lora is not None:
        expected = {n: tuple(p.shape) for n, p in module.named_parameters() if p.requires_grad}
    else:
        expected = {n: tuple(t.shape) for n, t in module.state_dict().items()}
    _check_keys(ckpt, expected, "LoRA weights" if spec.lora is not None else "weights")
    if ckpt.state_dict is None:
        _load_sharded(ckpt.path, module, expected)
    else:
        module.load_state_dict({k: ckpt.state_dict[k] for k in expected}, strict=False)
    refuse_nonfinite(module.named_parameters(), str(ckpt.path))
    return built


# -- helpers ------------------------------------------------------------------------------


def _module_class(kind: str) -> type:
    if kind == "grpo":
        from pebr_lightning.modules.grpo import GRPOModule

        return GRPOModule
    from pebr_lightning.modules.sft import SFTModule

    return SFTModule


def _safe_globals() -> list[type]:
    """The classes a checkpoint's hyper-parameters may hold besides plain data."""
    from pebr_lightning.algorithms.loss_config import GRPOLossConfig
    from pebr_lightning.data.prompts import PromptConfig
    from pebr_lightning.engines import RolloutConfig
    from pebr_lightning.models.policy import LoraConfig, PolicySpec, QuantizationConfig
    from pebr_lightning.models.rollout import SamplingConfig
    from pebr_lightning.modules.grpo_update import UpdateConfig
    from pebr_lightning.modules.optim import OptimConfig
    from pebr_lightning.rewards.registry import RewardSpec

    return [
        PolicySpec,
        UpdateConfig,
        LoraConfig,
        QuantizationConfig,
        PromptConfig,
        OptimConfig,
        SamplingConfig,
        GRPOLossConfig,
        RolloutConfig,
        RewardSpec,
    ]


def _former_names() -> list[tuple[type, str]]:
    """Config classes that moved, under the names older checkpoints record."""
    from pebr_lightning.algorithms.loss_config import GRPOLossConfig

    return [
        (GRPOLossConfig, "pebr_lightning.modules.grpo.GRPOLossConfig"),  # until 2026-12-01
        (GRPOLossConfig, "pebr_lightning.modules.grpo_update.GRPOLossConfig"),  # until 2026-12-06
    ]


def _torch_load(path: Path) -> Any:
    with torch.serialization.safe_globals([*_safe_globals(), *_former_names()]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as err:
            reason = load_failure_reason(err)
            if "global" not in reason.lower():
                raise PebrError(f"{path}: cannot read the checkpoint: {reason}") from None
            raise PebrError(
                f"{path}: holds an object export does not load ({reason}); only tensors, "
                "plain data and pebr's config classes are read from a checkpoint"
            ) from None
        except (RuntimeError, EOFError, OSError, ValueError) as err:
            raise PebrError(
                f"{path}: cannot read the checkpoint (truncated, or not written by "
                f"torch.save?): {load_failure_reason(err)}"
            ) from None


def _read_sharded(path: Path) -> Checkpoint:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from pebr_lightning.parallel.dcp_metadata import read_dcp_metadata

    if not (path / META_FILE).is_file() or not (path / DCP_METADATA).is_file():
        raise PebrError(
            f"{path}: not a checkpoint: expected a .ckpt file or a sharded checkpoint folder "
            f"({META_FILE} + {DCP_METADATA}, from save_distributed_checkpoint=True)"
        )
    meta = _torch_load(path / META_FILE)
    if not isinstance(meta, dict):
        raise PebrError(f"{path / META_FILE}: not a Lightning checkpoint's metadata")
    metadata = read_dcp_metadata(path)  # never unpickles anything but DCP's own classes
    shapes: dict[str, tuple[int, ...] | None] = {}
    for key, item in metadata.state_dict_metadata.items():
        fqn = (metadata.planner_data or {}).get(key)
        if fqn and fqn[0] == "state_dict" and len(fqn) == 2:
            name = fqn[1]
        elif key.startswith("state_dict."):
            name = key.removeprefix("state_dict.")
        else:
            continue  # optimizer_N and anything else
        is_tensor = isinstance(item, TensorStorageMetadata)
        shapes[name] = tuple(item.size) if is_tensor else None
    return Checkpoint(path, _hyper_parameters(path / META_FILE, meta), shapes, None)


def _load_sharded(path: Path, module: Any, expected: dict[str, tuple[int, ...]]) -> None:
    """Read the shards straight into the module's tensors (DCP copies, casting dtype)."""
    from pebr_lightning.parallel.dcp_metadata import load_sharded_state

    own = module.state_dict()
    state = {"state_dict": {k: own[k] for k in expected}}
    with warnings.catch_warnings():
        # One process without a process group is exactly the intent here.
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        load_sharded_state(state, path)


def _hyper_parameters(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    hparams = data.get("hyper_parameters")
    if not isinstance(hparams, dict):
        raise PebrError(
            f"{path}: the checkpoint holds no hyper-parameters to rebuild the module from"
        )
    return dict(hparams)


def _as_config(hint: Any, value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value)  # unpickling skipped __post_init__'s checks
    if isinstance(value, dict):
        for option in typing.get_args(hint) or (hint,):
            if isinstance(option, type) and dataclasses.is_dataclass(option):
                return option(**value)
    return value


def _check_keys(ckpt: Checkpoint, expected: dict[str, tuple[int, ...]], what: str) -> None:
    found = ckpt.shapes
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [
        f"{k} {found[k]} != {expected[k]}"
        for k in sorted(set(expected) & set(found))
        if found[k] != expected[k]
    ]
    problems = [
        f"{len(names)} {label}: {_few(names)}"
        for label, names in (("missing", missing), ("unexpected", unexpected), ("shape", wrong))
        if names
    ]
    if problems:
        raise PebrError(
            f"{ckpt.path}: its weights do not match the policy rebuilt from its "
            f"hyper-parameters ({len(expected)} {what} expected, {len(found)} stored); "
            + "; ".join(problems)
        )


def _save_adapter(module: Any, spec: PolicySpec, folder: Path) -> None:
    from pebr_lightning.models.policy import resolve_model_path

    # The base is what the run loaded: the model it names (for a stage that started
    # from another stage's adapter folder, that folder).
    module.policy.peft_config["default"].base_model_name_or_path = resolve_model_path(spec.model)
    module.policy.save_pretrained(str(folder))
    module.processor.save_pretrained(str(folder))


def _save_merged(module: Any, spec: PolicySpec, folder: Path) -> None:
    policy = module.policy
    if spec.lora is not None:
        policy = policy.merge_and_unload()
        module.policy = policy  # the PEFT wrapper is spent
    policy.save_pretrained(str(folder))
    module.processor.save_pretrained(str(folder))


def _check_out(out: Path, overwrite: bool, checkpoint: Path) -> None:
    if out.exists() and not out.is_dir():
        raise PebrError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise PebrError(f"{out}: exists and is not empty; pass --overwrite to replace it")
    if checkpoint.resolve().is_relative_to(out.resolve()):
        raise PebrError(f"{checkpoint}: lies inside --out {out}, which export replaces")


def _replace_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished export into place; a replaced folder goes only after that."""
    if not out.exists():
        os.replace(tmp, out)
        return
    if any(out.iterdir()) and not overwrite:  # appeared while exporting
        raise PebrError(f"{out}: exists and is not empty; pass --overwrite to replace it")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _few(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" (and {len(names) - n} more)" if len(names) > n else "")
