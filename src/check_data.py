"""Check a dataset before a long job: `python src/check_data.py data=<name> data.root=DIR` reads every file of every
split as training would, lists the unusable ones and summarises each split (exit 0 clean, 1 bad files, 2 bad layout)."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from vision_mamba.data.check import check_splits
from vision_mamba.utils.utils import exit_on_user_error


def check(cfg: DictConfig) -> int:
    """Read every file of ``cfg.data``'s splits, print the bad ones and the summary; the exit status."""
    datamodule = hydra.utils.instantiate(cfg.data)
    splits = datamodule.check_plan()
    bad = check_splits(splits, workers=cfg.get("workers"), show_progress=cfg.get("progress", True))
    for sample in bad:
        print(f"bad: {sample}")
    for split in splits:
        print(f"{split.name}: " + ", ".join(f"{key} {value}" for key, value in split.summary.items()))
    if bad:
        print(f"{len(bad)} unusable file(s): training stops at the first one (data.bad_images=error); replace or "
              "delete them, or train with data.bad_images=skip to skip them")
        return 1
    print(f"all {sum(len(s.items) for s in splits)} samples of {cfg.data.root} are usable")
    return 0


@hydra.main(version_base="1.3", config_path="../conf", config_name="check_data.yaml")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    sys.exit(check(cfg))


if __name__ == "__main__":
    main()
