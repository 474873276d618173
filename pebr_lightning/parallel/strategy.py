"""FSDP2 through Lightning: ModelParallelStrategy, data-parallel over every process.

Lightning's ModelParallelStrategy builds a 2-D device mesh (data parallel across
nodes, tensor parallel within a node, by default) and leaves the parallelisation to
the module's `configure_model`. PeBR shards the policy with FSDP2 over all
processes and does no tensor parallelism, so this subclass fixes the mesh to
`data_parallel = world size, tensor_parallel = 1`: the same config then runs on one
node or many (`num_nodes`, `devices`), and each process gets its own share of the
data. The FSDP2 settings live here so a config chooses them in the strategy block;
the modules read them in `configure_model` (modules/shared.py `shard_module`).

    trainer:
      strategy:
        class_path: pebr_lightning.parallel.FSDP2Strategy
        init_args: {reshard_after_forward: true}
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.constants import default_pg_timeout


class FSDP2Strategy(ModelParallelStrategy):
    def __init__(
        self,
        reshard_after_forward: bool = True,
        param_dtype: str | None = None,
        reduce_dtype: str | None = None,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        """
        Args:
            reshard_after_forward: free each unit's gathered weights after its forward
                (less memory, one more all-gather in backward); false keeps them.
            param_dtype: FSDP mixed precision: dtype the gathered weights compute in
                (e.g. bfloat16); null keeps the stored dtype.
            reduce_dtype: dtype of the gradient reduce-scatter (e.g. float32); null
                keeps the gradient's dtype.
            save_distributed_checkpoint: each process writes its own shard into a
                checkpoint folder (fast, no full copy on one process); false gathers
                a single file on rank 0. `pebr export` reads both.
            process_group_backend: nccl on GPUs, gloo on CPU by default.
            timeout: how long a collective waits for the other processes.
        """
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.reshard_after_forward = reshard_after_forward
        self.param_dtype = param_dtype
        self.reduce_dtype = reduce_dtype

    def setup_environment(self) -> None:
        # Known only now (the trainer sets num_nodes and the devices after __init__).
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        """Sharded saves go to `X.partial/` and are swapped in once every shard is written.

        Lightning writes a sharded checkpoint into its final folder, over the previous
        one of that name: a full disk or a kill half-way left a folder mixing old and
        new shards. Here `last.ckpt` is the previous complete folder until the new
        one is. (A single-file save goes through the trainer's CheckpointIO, which
        `pebr fit` makes atomic.)
        """
        import shutil
        from pathlib import Path

        if not self._save_distributed_checkpoint or storage_options is not None:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        target = Path(self.broadcast(filepath))
        partial = target.with_name(target.name + ".partial")
        if self.global_rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        self.barrier("pebr_checkpoint_partial")
        super().save_checkpoint(checkpoint, partial)
        self.barrier("pebr_checkpoint_written")
        if self.global_rank == 0:
            old = target.with_name(target.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            if target.is_dir():
                target.rename(old)
            elif target.exists():
                target.unlink()
            partial.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        self.barrier("pebr_checkpoint_swapped")

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> Any:
        """Lightning's loader for a single file; a sharded folder is read here instead.

        Lightning lets DCP pick its reader, and DCP's default reads `.metadata` with
        plain pickle and every non-tensor entry (the optimizer's param groups) with
        `torch.load(weights_only=False)`: a crafted folder would run code on resume.
        The same steps as Lightning's sharded branch, through the safe reader.
        """
        from pathlib import Path

        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        from pebr_lightning.parallel.dcp_metadata import load_sharded_state, read_dcp_metadata

        path = Path(self.broadcast(checkpoint_path))
        if not path.is_dir():
            return super().load_checkpoint(path, weights_only=weights_only)
        read_dcp_metadata(path)  # a clear error before any collective starts
        module = self.model
        strict = self.lightning_module.strict_loading if self.lightning_module else True
        model_state = {"state_dict": get_model_state_dict(module)}
        load_sharded_state(model_state, path)
        module.load_state_dict(model_state["state_dict"], strict=strict)
        self._refuse_nonfinite(model_state["state_dict"], path)
        for index, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{index}"
            optim_state = {key: get_optimizer_state_dict(module, optimizer)}
            load_sharded_state(optim_state, path)
            set_optimizer_state_dict(
                module,
                optimizer,
                optim_state_dict=optim_state[key],
                options=StateDictOptions(cpu_offload=True),
            )
        return _read_meta(path / "meta.pt")

    def _refuse_nonfinite(self, state: dict[str, Any], path: Any) -> None:
        """Every rank stops when any rank's shard holds NaN or inf (a rank alone raising
        would leave the others waiting in the next collective)."""
        import torch

        from pebr_lightning.models.finite import nonfinite_names, refuse_names

        bad = nonfinite_names(state.items())
        count = torch.tensor(float(len(bad)), device=self.root_device)
        total = int(self.reduce(count, reduce_op="sum").item())
        if total and not bad:
            from pebr_lightning.errors import PebrError

            raise PebrError(f"{path}: {total} weight shard(s) on other ranks hold NaN or inf")
        refuse_names(bad, str(path))

    def shard_settings(self) -> dict[str, Any]:
        """Keyword arguments of `parallel.sharding.shard_policy` (dtypes as torch dtypes)."""
        import torch

        return {
            "reshard_after_forward": self.reshard_after_forward,
            "param_dtype": None if self.param_dtype is None else getattr(torch, self.param_dtype),
            "reduce_dtype": None
            if self.reduce_dtype is None
            else getattr(torch, self.reduce_dtype),
        }


def _read_meta(path: Any) -> dict[str, Any]:
    """Lightning's `meta.pt` (epoch, loops, callbacks, hyper-parameters): tensors and
    plain data only, whatever the caller's `weights_only` said."""
    import torch

    from pebr_lightning.errors import PebrError

    try:
        meta = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PebrError(f"{path}: missing: not a complete sharded checkpoint") from None
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PebrError(f"{path}: refused to load: {reason}") from None
    if not isinstance(meta, dict):
        raise PebrError(f"{path}: not a Lightning checkpoint's metadata")
    return meta
