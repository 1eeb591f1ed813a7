"""params.yaml `sweep:` — where a sweep runs and which remotes carry it (flags of `sasgate sweep
submit` override each). Only pydantic is imported, so sasgate/params.py can import it without a cycle.
No stage reads this section, so changing it reruns nothing."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

Executor = Literal["local", "slurm"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class SlurmSettings(_Strict):
    """What `sbatch` gets for the job array (submitit's SlurmExecutor)."""

    partition: str | None = None  # None: the cluster's default partition
    account: str | None = None
    array_parallelism: Annotated[int, Field(gt=0)] = 16  # points running at once (%N of the array)
    mem_gb: Annotated[float, Field(gt=0)] | None = None  # None: the partition's default
    setup: list[str] = []  # shell lines each job runs first, e.g. "source /path/to/.venv/bin/activate"


class SweepParams(_Strict):
    executor: Executor = "local"  # local: submitit's local executor (this machine); slurm: a job array
    git_remote: str = "origin"  # jobs clone the sweep's commit from it and push their experiments to it
    dvc_remote: str | None = None  # None: the project's default DVC remote
    folder: str = "sweeps"  # sweep records and job logs, relative to the project (git-ignored)
    time_min: Annotated[int, Field(gt=0)] = 120  # wall-time limit of one point (Slurm --time; local timeout)
    gpus_per_node: Annotated[int, Field(ge=0)] = 0
    cpus_per_task: Annotated[int, Field(gt=0)] = 1  # stages run one at a time with runtime.threads threads
    scratch: str | None = None  # where a job clones the repository (None: the node's temp folder)
    slurm: SlurmSettings = SlurmSettings()
