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
