"""Hydra glue for runs at scale: the multirun summary, and one writable output folder per run -- unique per launch,
shared by every process of a DDP/torchrun/SLURM launch."""

from __future__ import annotations

import csv
import itertools
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from vision_mamba.utils.utils import exit_with_user_error

RUN_ID_ENV = "VIM_RUN_ID"
# where the processes of one torchrun launch agree on a run id (a key of the elastic agent's store)
RUN_ID_STORE_KEY = "vision_mamba/run_id"


# --- multirun summary ----------------------------------------------------------------------------------------------


class MultirunSummary(Callback):
    """Writes ``<sweep dir>/summary.csv``: one row per job with its overrides, status and returned metric.

    Rewritten after every job, so a sweep that dies half-way still leaves the rows of the jobs that ended.
    Works with any in-process launcher (basic, and the Optuna sweeper, which uses it).
    """

    def __init__(self, filename: str = "summary.csv") -> None:
        self.filename = filename
        self.rows: list[dict[str, Any]] = []

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.rows = []

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        hydra_cfg = config.get("hydra") if "hydra" in config else None
        if hydra_cfg is None or getattr(hydra_cfg.mode, "name", str(hydra_cfg.mode)) != "MULTIRUN":
            return
        status = getattr(job_return.status, "name", str(job_return.status))
        value = job_return._return_value if status == "COMPLETED" else None
        if status == "COMPLETED" and value is None and config.get("optimized_metric"):
            status = "NO_METRIC"  # the job ended before it validated (see get_metric_value): missing, not failed
        overrides = list(job_return.overrides or [])
        row: dict[str, Any] = {
            "job": hydra_cfg.job.num,
            "status": status,
            "metric": config.get("optimized_metric"),
            "value": _number(value),
            "output_dir": hydra_cfg.runtime.output_dir,
            "overrides": " ".join(overrides),
        }
        for override in overrides:
            key, _, val = override.partition("=")
            row[key.lstrip("+~")] = val
        self.rows.append(row)
        self._write(Path(hydra_cfg.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.rows:
            path = self._write(Path(config.hydra.sweep.dir))
            print(f"Multirun summary ({len(self.rows)} jobs): {path}")

    def _write(self, sweep_dir: Path) -> Path:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        columns: list[str] = []
        for row in self.rows:
            columns += [c for c in row if c not in columns]
        path = sweep_dir / self.filename
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, path)
        return path


def _number(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


# --- one writable output folder per run ----------------------------------------------------------------------------


def pin_run_id_from_launcher(environ: dict[str, str] = os.environ) -> str | None:
    """Give every process of one multi-process launch the same run folder name.

    With torchrun or srun each process composes its own config, and ``${now:...}`` can differ by a second
    between them (or between nodes). conf/hydra/default.yaml names the folder ``$VIM_RUN_ID`` when it is set;
    here it is set, when the user did not set it, from the launcher's job id (torchrun's ``--rdzv-id``, SLURM's
    job id) or else from a name the processes of a torchrun launch agree on through its agent's store (a static
    ``--master-addr``/``--master-port`` launch has no job id). Returns the id used.
    """
    if environ.get(RUN_ID_ENV):
        return environ[RUN_ID_ENV]
    run_id = None
    torchrun = "TORCHELASTIC_RUN_ID" in environ and int(environ.get("WORLD_SIZE", "1")) > 1
    if torchrun and environ["TORCHELASTIC_RUN_ID"] != "none":
        run_id = f"torchrun_{environ['TORCHELASTIC_RUN_ID']}"
    elif environ.get("SLURM_JOB_ID") and int(environ.get("SLURM_NTASKS", "1")) > 1:
        # the same id after a requeue, so the requeued job resumes in the same folder
        run_id = f"slurm_{environ['SLURM_JOB_ID']}"
    elif torchrun and environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        run_id = agreed_run_id(environ["MASTER_ADDR"], int(environ["MASTER_PORT"]))
    if run_id:
        environ[RUN_ID_ENV] = run_id
    return run_id


def agreed_run_id(host: str, port: int) -> str:
    """The run id of a torchrun launch, through the store its elastic agent serves at MASTER_ADDR:MASTER_PORT: the
    first process to ask proposes the launch time (plus a random suffix), every other one reads that proposal.
    The store outlives worker restarts, so a restarted worker lands in the same folder."""
    from datetime import timedelta

    from torch.distributed import TCPStore

    store = TCPStore(host, port, is_master=False, timeout=timedelta(minutes=5))
    proposal = f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{secrets.token_hex(3)}"
    return store.compare_set(RUN_ID_STORE_KEY, "", proposal).decode()


def unwritable_reason(folder: Path) -> str | None:
    """Why this process could not create or write ``folder`` (checked on its nearest existing ancestor), or None.
    Nothing is created."""
    folder = folder.absolute()
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None


def claim_unique_folder(folder: Path) -> Path:
    """Create ``folder``, or ``folder_1``, ``folder_2``... if another run holds it: mkdir is atomic, so two runs
    started in the same second never get the same folder."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    for n in itertools.count():
        candidate = folder if n == 0 else folder.with_name(f"{folder.name}_{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


class RunFolder(Callback):
    """Checks the output folder of a run (or a sweep) before Hydra makes it, and makes one named by the time unique.

    A folder that cannot be written is one ``error:`` line (exit status 2) before anything runs. Hydra names the
    folder by the launch time to the second; when the name comes from the time (not from ``$VIM_RUN_ID``, which
    all processes of a launch share, nor from an explicit ``hydra.run.dir``), the folder is claimed here, so that
    two runs started in the same second get two folders.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.claim(config, "run")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.claim(config, "sweep")

    @staticmethod
    def claim(config: DictConfig, mode: str) -> None:
        node = config.hydra[mode]
        folder = Path(str(node.dir))
        fix = "set paths.log_dir=<a writable folder> (or hydra.run.dir=...)"
        reason = unwritable_reason(folder)
        if reason:
            exit_with_user_error(f"the output folder {folder} cannot be written ({reason}): {fix}")
        named_by_time = "${now:" in str(OmegaConf.to_container(node, resolve=False)["dir"])
        if not named_by_time or os.environ.get(RUN_ID_ENV):
            return
        try:
            folder = claim_unique_folder(folder)
        except OSError as e:  # refused although its parent looked writable (an ACL, a full disk)
            exit_with_user_error(f"the output folder {folder} cannot be made ({e.strerror}): {fix}")
        with read_write(config.hydra), open_dict(config.hydra):
            node.dir = str(folder)
            if mode == "sweep":  # each job re-composes its config from these overrides
                config.hydra.overrides.hydra.append(f"hydra.sweep.dir='{folder}'")


def pin_ddp_relaunch() -> None:
    """Make Lightning's DDP re-launch of this script start *this* job in *this* folder.

    Lightning starts ranks 1.. as ``python <script> <sys.argv[1:]> hydra.run.dir=<hydra.run.dir>``. In a
    multirun that would be wrong twice: ``hydra.run.dir`` is not the job's folder (the sweep sub-folder is), and
    sys.argv holds ``-m`` and the comma lists, so every child would start the whole sweep. Here sys.argv becomes
    this job's own overrides and ``hydra.run.dir`` this job's folder, resolved once (no second ``${now:...}``).
    Only the process that launches the others (local rank 0, not under torchrun/SLURM) needs this.
    """
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized() or int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return
    hydra_cfg = HydraConfig.get()
    output_dir = OmegaConf.select(hydra_cfg, "runtime.output_dir", default=None, throw_on_missing=False)
    if not output_dir:  # a config composed without running a job (tests): nothing will be re-launched
        return
    with read_write(hydra_cfg), open_dict(hydra_cfg):
        hydra_cfg.run.dir = output_dir
    task_overrides = [o for o in hydra_cfg.overrides.task if not o.startswith("hydra.run.dir=")]
    sys.argv = [sys.argv[0], *task_overrides]
