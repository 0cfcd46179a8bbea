"""Data-parallel runs under `accelerate launch` / `torchrun`: every process runs the same
command, each backend call's requests are split across the processes and gathered back, and
rank 0 alone writes the run directory (README, "Scaling out")."""
from dln_ens.distributed.processes import Processes, init_processes, processes_from_env
from dln_ens.distributed.sharded_lm import ShardedLanguageModel, ShardedPool
from dln_ens.distributed.run_dir import process_run_dir, quiet_unless_main
from dln_ens.distributed.shard import shard_owners

__all__ = ["Processes", "init_processes", "processes_from_env", "ShardedLanguageModel", "ShardedPool",
           "shard_owners", "process_run_dir", "quiet_unless_main"]
