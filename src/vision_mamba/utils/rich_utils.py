"""Print the composed config as a rich tree and save it next to the run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import rich
import rich.syntax
import rich.tree
from lightning_utilities.core.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf


@rank_zero_only
def print_config_tree(
    cfg: DictConfig,
    print_order: Sequence[str] = ("data", "model", "task", "callbacks", "logger", "trainer", "paths", "extras"),
    resolve: bool = False,
    save_to_file: bool = False,
) -> None:
    """Print the config tree in a fixed order (the rest after), optionally saving it to ``output_dir``."""
    tree = rich.tree.Tree("CONFIG", style="dim", guide_style="dim")
    queue = [f for f in print_order if f in cfg] + [f for f in cfg if f not in print_order]
    for field in queue:
        branch = tree.add(field, style="dim", guide_style="dim")
        content = cfg[field]
        text = OmegaConf.to_yaml(content, resolve=resolve) if isinstance(content, DictConfig) else str(content)
        branch.add(rich.syntax.Syntax(text, "yaml"))
    rich.print(tree)
    if save_to_file:
        with open(Path(cfg.paths.output_dir, "config_tree.log"), "w") as file:
            rich.print(tree, file=file)
