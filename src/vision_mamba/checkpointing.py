"""Checkpoint files of a run: written atomically as plain data, read only with weights_only, resumed with their config.

- ``load_checkpoint(path)``: the one loader every entry point uses (torch.load with ``weights_only=True`` and a short
  allow-list; any other file is refused with one line naming what is wrong), ``check_checkpoint_file(path)`` the same
  checks without loading the tensors. Both live in models/checkpoints.py so that plain models load weights without
  Lightning; they are imported from here.
- ``SafeCheckpointIO``: the Lightning checkpoint-IO plugin of every trainer. It writes a checkpoint as plain data
  (no OmegaConf or numpy objects) to a temporary file and renames it, so a kill never leaves half a file and every
  checkpoint loads with ``weights_only=True``; it reads through ``load_checkpoint``.
- ``resume_argv(argv)``: ``hydra.run.dir=<run> ckpt_path=last`` (or ``ckpt_path=<run>/checkpoints/<file>``)
  continues that run with the config it was trained with: its recorded overrides and config choices, then the
  overrides given now; each resume records its own config under ``<run>/.hydra/resume_<time>/``.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, ListConfig, OmegaConf

from vision_mamba.models.checkpoints import SAFE_GLOBALS, CheckpointError, check_checkpoint_file, load_checkpoint

__all__ = [
    "CheckpointError",
    "LIGHTNING_CKPT_KEYWORDS",
    "RECORD",
    "SAFE_GLOBALS",
    "SafeCheckpointIO",
    "check_checkpoint_file",
    "load_checkpoint",
    "resume_argv",
    "run_folder_of",
    "to_plain",
]

# ckpt_path values Lightning resolves itself (`last`: <run>/checkpoints/last.ckpt, `hpc`: SLURM's requeue checkpoint)
LIGHTNING_CKPT_KEYWORDS = ("last", "best", "hpc", "registry")
RECORD = ".hydra"  # where Hydra records a run's config: config.yaml, hydra.yaml, overrides.yaml


# --- writing -----------------------------------------------------------------------------------------------------


def to_plain(obj: Any) -> Any:
    """``obj`` with OmegaConf containers, other mappings and numpy values turned into dicts, lists, tensors and
    Python scalars: what ``torch.load(weights_only=True)`` accepts. Tensors and OrderedDicts (state dicts) stay."""
    if isinstance(obj, (DictConfig, ListConfig)):
        try:
            return OmegaConf.to_container(obj, resolve=True)
        except Exception:  # an interpolation that only resolves inside the whole config: keep its text
            return OmegaConf.to_container(obj, resolve=False)
    if type(obj) is OrderedDict:
        return OrderedDict((k, to_plain(v)) for k, v in obj.items())
    if isinstance(obj, Mapping):  # dict, and subclasses such as Lightning's AttributeDict of hyper-parameters
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_plain(v) for v in obj]
    if isinstance(obj, tuple):  # a namedtuple becomes a plain tuple
        return tuple(to_plain(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


# what Lightning stores as a record of the arguments (LightningModule / LightningDataModule.save_hyperparameters);
# nothing is rebuilt from them on resume
HYPER_PARAMETER_KEYS = ("hyper_parameters", "datamodule_hyper_parameters")


def to_record(obj: Any) -> Any:
    """``to_plain(obj)`` with every other value (a ``functools.partial`` of a model head, a class, a path) replaced
    by its ``repr``: the hyper-parameters a task received stay readable without pickling objects."""
    obj = to_plain(obj)
    if isinstance(obj, dict):
        return type(obj)((k, to_record(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_record(v) for v in obj)
    return obj if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)) else repr(obj)


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with atomic, plain-data writes and weights_only reads.

    Save: ``to_plain(checkpoint)`` (the hyper-parameters ``to_record``-ed) goes to ``<dir>/.<name>.tmp-*``, is fsynced, checked to load with
    ``weights_only=True`` (its pickle record names no other type), then ``os.replace``-d onto the final name:
    readers see the old complete file or the new complete one (``os.replace`` is atomic on POSIX file systems).
    Load: ``load_checkpoint`` whatever ``weights_only`` Lightning asks for. Remote paths use Lightning's own IO
    (with ``weights_only=True``).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        checkpoint = {k: to_record(v) if k in HYPER_PARAMETER_KEYS else to_plain(v) for k, v in checkpoint.items()}
        if not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; a checkpoint gets the umask's permissions
            with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
                refused = torch.serialization.get_unsafe_globals_in_checkpoint(tmp)
            if refused:
                raise TypeError(f"a checkpoint must hold plain data to load with weights_only=True; {path.name} "
                                f"would hold {sorted(refused)} (convert them in the state_dict that adds them)")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if not _is_local(path):
            return super().load_checkpoint(path, map_location=map_location or "cpu", weights_only=True)
        return load_checkpoint(path, map_location=map_location or "cpu")


def _umask() -> int:
    try:  # Linux reports it without changing it
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _is_local(path) -> bool:
    protocol = get_filesystem(path).protocol
    return "file" in (protocol if isinstance(protocol, tuple) else (protocol,))


# --- resuming ----------------------------------------------------------------------------------------------------


def run_folder_of(ckpt_path: str | os.PathLike) -> Path | None:
    """The run folder of ``<run>/checkpoints/<file>.ckpt`` (or of ``<run>/<file>.ckpt``, SLURM's ``hpc_ckpt_N``)
    when that folder holds the run's config record, else None."""
    ckpt = Path(ckpt_path).resolve()
    for folder in (ckpt.parent.parent, ckpt.parent):
        if (folder / RECORD / "overrides.yaml").is_file():
            return folder
    return None


def resume_argv(argv: list[str], config_dir: str | os.PathLike, environ: Mapping[str, str] = os.environ) -> list[str]:
    """The command line that continues a run: ``sys.argv`` with the run's own config in front.

    With ``ckpt_path=last`` (or another keyword) and ``hydra.run.dir=<run>``, or ``ckpt_path=<a checkpoint inside a
    run folder>``, the run's config-group choices (``<run>/.hydra/hydra.yaml``; those whose option still exists in
    ``config_dir``) and the overrides recorded in ``<run>/.hydra/overrides.yaml`` come first, then the overrides
    given now, which win. A checkpoint path without ``hydra.run.dir`` continues in the checkpoint's run folder.
    When the run folder already holds a record, this invocation writes its own under ``.hydra/resume_<time>/``;
    processes other than rank 0 (DDP children, torchrun and srun ranks) write none. Multirun and Hydra flags
    (``-m``, ``--cfg``, ...) are left as they are.
    """
    args = list(argv[1:])
    if any(a.startswith("-") for a in args):
        return list(argv)
    given = dict(_split(a) for a in args)
    ckpt, run_dir = given.get("ckpt_path"), given.get("hydra.run.dir")
    if not ckpt or ckpt == "null":
        source = None
    elif ckpt in LIGHTNING_CKPT_KEYWORDS:
        source = Path(run_dir) if run_dir and (Path(run_dir) / RECORD / "overrides.yaml").is_file() else None
    else:
        source = run_folder_of(ckpt)
    if source is not None:
        recorded = [str(o) for o in OmegaConf.load(source / RECORD / "overrides.yaml")]
        keys = set(given) | {_split(o)[0] for o in recorded}
        choices = [f"{group}={choice}" for group, choice in _choices(source, config_dir).items() if group not in keys]
        args = choices + [o for o in recorded if _split(o)[0] not in given] + args
        if not run_dir:
            run_dir = str(source)
            args.append(f"hydra.run.dir={run_dir}")
    if "hydra.output_subdir" not in given:
        if _is_secondary_rank(environ):
            args.append("hydra.output_subdir=null")
        elif run_dir and (Path(run_dir) / RECORD / "config.yaml").is_file():
            args.append(f"hydra.output_subdir={_new_record(Path(run_dir))}")
    return [argv[0], *args]


def _split(override: str) -> tuple[str, str | None]:
    """``key=value`` (also ``+key=``, ``++key=``, ``~key``; a quoted value unquoted) as (key, value)."""
    key, sep, value = override.partition("=")
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1]
    return key.lstrip("+~"), value if sep else None


def _choices(run: Path, config_dir: str | os.PathLike) -> dict[str, str]:
    """The run's top-level config-group choices (``data: digits``, ``model: vim_small``, ...) that still exist."""
    hydra_record = run / RECORD / "hydra.yaml"
    if not hydra_record.is_file():
        return {}
    choices = OmegaConf.select(OmegaConf.load(hydra_record), "hydra.runtime.choices", default=None) or {}
    return {
        group: choice for group, choice in choices.items()
        if "/" not in group and group != "hydra" and isinstance(choice, str)
        and (Path(config_dir) / group / f"{choice}.yaml").is_file()
    }


def _new_record(run: Path) -> str:
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    name, n = f"resume_{stamp}", 1
    while (run / RECORD / name).exists():
        name, n = f"resume_{stamp}_{n}", n + 1
    return f"{RECORD}/{name}"


def _is_secondary_rank(environ: Mapping[str, str]) -> bool:
    """Set by torchrun (RANK), Lightning's DDP re-launch (LOCAL_RANK, NODE_RANK) and srun (SLURM_PROCID)."""
    return any(environ.get(k, "0").strip() not in ("", "0") for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))
