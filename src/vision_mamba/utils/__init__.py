"""Utilities shared by the entry points: logging, config printing, instantiation and error reporting."""

from vision_mamba.utils.errors import UserError
from vision_mamba.utils.instantiators import instantiate_callbacks, instantiate_loggers
from vision_mamba.utils.logging_utils import log_hyperparameters
from vision_mamba.utils.pylogger import RankedLogger
from vision_mamba.utils.rich_utils import print_config_tree
from vision_mamba.utils.utils import extras, get_metric_value, task_wrapper

__all__ = [
    "RankedLogger",
    "UserError",
    "extras",
    "get_metric_value",
    "instantiate_callbacks",
    "instantiate_loggers",
    "log_hyperparameters",
    "print_config_tree",
    "task_wrapper",
]
