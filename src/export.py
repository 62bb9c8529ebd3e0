"""Export a trained network: `python src/export.py ckpt_path=PATH format=onnx|torch_export output=FILE`."""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

from eval import checkpoint_config
from vision_mamba.deploy import export_network, load_run
from vision_mamba.deploy.exporting import check_exportable, export_metadata
from vision_mamba.deploy.runs import class_names
from vision_mamba.utils import RankedLogger, extras
from vision_mamba.utils.utils import exit_on_user_error

log = RankedLogger(__name__, rank_zero_only=True)


def export(cfg: DictConfig) -> dict[str, Any]:
    """Build the run's network with its weights and write it in `cfg.format` to `cfg.output`."""
    run = load_run(cfg)
    check_exportable(run.kind)
    img_size = int(cfg.img_size or (cfg.task.inference.crop_size if run.kind == "segmentation" else cfg.data.img_size))
    names = None
    if run.kind == "classification":
        names = class_names(run, hydra.utils.instantiate(cfg.data))
    metadata = export_metadata(run.kind, img_size, cfg.data.mean, cfg.data.std, names, cfg.model.model_name,
                               cfg.data.get("crop_pct"), cfg.data.get("interpolation"))
    log.info(f"Exporting the {run.kind} network ({cfg.model.model_name}) at {img_size}x{img_size} as {cfg.format}")
    report = export_network(run.net, run.kind, img_size, cfg.output, cfg.format, metadata, int(cfg.batch_size),
                            float(cfg.tolerance))
    log.info(
        f"Wrote {report['output']} ({report['bytes'] / 2**20:.1f} MiB): input '{metadata['input']['name']}' "
        f"(batch, 3, {img_size}, {img_size}), output '{metadata['output']['name']}'; at batch "
        f"{report['checked_batch']} it matches PyTorch within {report['relative_error']:.1e} relative error"
    )
    return report


@hydra.main(version_base="1.3", config_path="../conf", config_name="export.yaml")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    checkpoint_config(cfg, "export")
    extras(cfg)
    export(cfg)


if __name__ == "__main__":
    main()
