"""DDP that launches each job's own processes: correct under `train.py -m`, where Lightning's own launcher is not.

Lightning's `ddp` starts ranks 1..N-1 by re-running the script with the same command line. Under a Hydra
multirun that command is the whole sweep, so every extra process runs every job again in its own directory
(Lightning #11300/#18175, Hydra #2070). Here rank 0 writes the job's resolved config (a plain YAML with the
run directory, run id and checkpoint already fixed) and starts the other ranks with
`python -m diffusion.run.worker <that file>`: one job, one process group, one run directory. Everything
else (addresses, ports, the watchdog that stops the group when one rank dies, SIGTERM forwarding) is
Lightning's. Where processes are created outside (SLURM's one task per GPU, torchrun) nothing is launched.
"""

import os
import subprocess
import sys
from pathlib import Path

import torch
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


class _JobLauncher(_SubprocessScriptLauncher):
    """Lightning's subprocess launcher, starting the worker entry point on this job's config file."""

    def __init__(self, config_path: Path, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.config_path = config_path

    def _call_children_scripts(self) -> None:
        self._check_can_spawn_children()
        env = self.cluster_environment
        os.environ.update(MASTER_ADDR=env.main_address, MASTER_PORT=str(env.main_port),
                          NODE_RANK=str(env.node_rank()), LOCAL_RANK=str(env.local_rank()),
                          WORLD_SIZE=str(self.num_processes * self.num_nodes))
        for local_rank in range(1, self.num_processes):
            child_env = {**os.environ, "LOCAL_RANK": str(local_rank)}
            command = [sys.executable, "-m", "diffusion.run.worker", str(self.config_path)]
            self.procs.append(subprocess.Popen(command, env=child_env))


class JobDDPStrategy(DDPStrategy):
    """`trainer.strategy=ddp` as train() builds it: DDP whose extra ranks run this job only."""

    def __init__(self, config_path: str | Path, **kwargs):
        # Gradients live in DDP's all-reduce buckets: no copy, and no stride mismatch for the 1×1 attention convs.
        kwargs.setdefault("gradient_as_bucket_view", True)
        super().__init__(**kwargs)
        self.config_path = Path(config_path)

    def _configure_launcher(self) -> None:
        self._launcher = _JobLauncher(self.config_path, self.cluster_environment, self.num_processes, self.num_nodes)

    def end_job(self, timeout_s: float = 300.0) -> None:
        """After fit: close the process group, let ranks 1..N-1 exit and clear the variables Lightning set,
        so the next job of a multirun starts its own group (Lightning closes it only at interpreter exit,
        and a leftover LOCAL_RANK would make the next job wait for ranks nobody starts)."""
        procs = getattr(self._launcher, "procs", [])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for proc in procs:
            proc.wait(timeout=timeout_s)
        if procs:  # only the process that launched the group owns these variables
            for key in DIST_ENV:
                os.environ.pop(key, None)
