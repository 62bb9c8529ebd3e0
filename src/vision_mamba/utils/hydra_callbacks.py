"""Hydra glue for runs at scale: the multirun summary, one run folder per run under DDP/torchrun/SLURM."""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

RUN_ID_ENV = "VIM_RUN_ID"


# --- multirun summary -------------------------------------------------------------------------------------------


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


# --- one output folder per run ----------------------------------------------------------------------------------


def pin_run_id_from_launcher(environ: dict[str, str] = os.environ) -> str | None:
    """Give every process of one multi-process launch the same run folder name.

    With torchrun or srun each process composes its own config, and ``${now:...}`` can differ by a second
    between them (or between nodes). conf/hydra/default.yaml names the folder ``$VIM_RUN_ID`` when it is set;
    here it is set from the launcher's shared job id when the user did not set it. Returns the id used.
    """
    if environ.get(RUN_ID_ENV):
        return environ[RUN_ID_ENV]
    run_id = None
    if environ.get("TORCHELASTIC_RUN_ID", "none") != "none" and int(environ.get("WORLD_SIZE", "1")) > 1:
        run_id = f"torchrun_{environ['TORCHELASTIC_RUN_ID']}"
    elif environ.get("SLURM_JOB_ID") and int(environ.get("SLURM_NTASKS", "1")) > 1:
        # the same id after a requeue, so the requeued job resumes in the same folder
        run_id = f"slurm_{environ['SLURM_JOB_ID']}"
    if run_id:
        environ[RUN_ID_ENV] = run_id
    return run_id


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
