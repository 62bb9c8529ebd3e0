"""Entry-point plumbing: optional extras, the task wrapper, metric lookup and short user-error reporting."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from functools import wraps
from importlib.util import find_spec
from typing import Any, NoReturn

from omegaconf import DictConfig

from vision_mamba.utils.errors import find_user_error, missing_config_value
from vision_mamba.utils.pylogger import RankedLogger
from vision_mamba.utils.rich_utils import print_config_tree

log = RankedLogger(__name__, rank_zero_only=True)


def extras(cfg: DictConfig) -> None:
    """Apply optional utilities before the task starts (warnings filter, config tree printing)."""
    if not cfg.get("extras"):
        log.warning("Extras config not found! <cfg.extras=null>")
        return
    if cfg.extras.get("ignore_warnings"):
        log.info("Disabling python warnings! <cfg.extras.ignore_warnings=True>")
        warnings.filterwarnings("ignore")
    if cfg.extras.get("cpu_threads"):
        import torch

        torch.set_num_threads(int(cfg.extras.cpu_threads))
    if cfg.extras.get("print_config"):
        log.info("Printing config tree with Rich! <cfg.extras.print_config=True>")
        print_config_tree(cfg, resolve=True, save_to_file=True)


def task_wrapper(task_func: Callable) -> Callable:
    """Wrap a task so that failures are logged and W&B is closed (needed for multiruns) whatever happens."""

    @wraps(task_func)
    def wrap(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
        try:
            metric_dict, object_dict = task_func(cfg=cfg)
        except Exception as ex:
            if find_user_error(ex) is None and missing_config_value(ex) is None:  # user errors get one line, later
                log.exception("")
            raise
        finally:
            log.info(f"Output dir: {cfg.paths.output_dir}")
            if find_spec("wandb"):
                import wandb

                if wandb.run:
                    log.info("Closing wandb!")
                    wandb.finish()
        return metric_dict, object_dict

    return wrap


def get_metric_value(metric_dict: dict[str, Any], metric_name: str | None) -> float | None:
    """The metric a sweep optimises, or None with a warning when the run ended before it was ever logged.

    The names themselves are checked before the run (vision_mamba.config_checks), so a missing value means the run
    stopped before its first validation: None is what a sweep records as missing (the basic sweeper's summary.csv
    marks the job NO_METRIC, the Optuna sweeper marks the trial failed and goes on).
    """
    if not metric_name:
        log.info("Metric name is None! Skipping metric value retrieval...")
        return None
    if metric_name not in metric_dict:
        log.warning(
            f"optimized_metric={metric_name} was never logged: the run ended before its first validation "
            "(trainer.max_epochs=0, trainer.max_steps shorter than an epoch, or trainer.limit_val_batches=0). "
            "No value is returned; a sweep records this job as missing."
        )
        return None
    metric_value = metric_dict[metric_name].item()
    log.info(f"Retrieved metric value! <{metric_name}={metric_value}>")
    return metric_value


def exit_on_user_error(main: Callable[[], Any]) -> Callable[[], Any]:
    """Run a Hydra main; a user error becomes one ``error: ...`` line on stderr and exit code 2."""

    @wraps(main)
    def wrap(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except Exception as ex:
            user_error = find_user_error(ex)
            if user_error is None:
                missing = missing_config_value(ex)
                if missing is None:
                    raise
                user_error = f"{missing} must be set: pass {missing}=VALUE on the command line"
                if missing == "data.root":
                    user_error += " (the folder that holds your dataset in its standard layout)"
            exit_with_user_error(user_error)

    return wrap


def exit_with_user_error(message: object) -> NoReturn:
    """The one-line report of a user error: ``error: <what is wrong and how to fix it>`` on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)

