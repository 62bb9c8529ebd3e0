"""Running at scale (issue #8): DDP on CPU, multirun summary, W&B offline, exact resume after SIGKILL, notebooks."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vision_mamba.checkpointing import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
TRAIN = [sys.executable, str(ROOT / "src" / "train.py")]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

# Tiny but real: the digits default + vim_digits at 16x16 (16 tokens), full validation split (360 images, which
# splits evenly over 2 processes), identity-like crops so 1- and 2-process runs see identical inputs.
FAST = [
    "trainer.accelerator=cpu", "trainer.max_epochs=2", "trainer.limit_train_batches=4", "trainer.log_every_n_steps=1",
    "trainer.deterministic=true", "data.num_workers=0", "data.persistent_workers=false", "data.img_size=16",
    "data.batch_size=32", "data.train_transform.scale=[1,1]", "data.train_transform.ratio=[1,1]",
    "model.scan_backend=torch", "extras.print_config=false", "test=false", "callbacks.model_summary=null",
    "callbacks.rich_progress_bar=null", "callbacks.model_checkpoint.every_n_train_steps=1",
]


def env() -> dict[str, str]:
    e = dict(os.environ)
    # one thread per process: on a shared 2-core machine, more threads only contend
    e.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true", HYDRA_FULL_ERROR="1")
    e.pop("VIM_RUN_ID", None)
    return e


def train(tmp: Path, data_dir: Path, *overrides: str, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    flags = [o for o in overrides if o.startswith("-")]  # Hydra wants -m before the overrides
    overrides = tuple(o for o in overrides if not o.startswith("-"))
    cmd = [*TRAIN, *flags, f"paths.log_dir={tmp}", f"paths.data_dir={data_dir}", *FAST, *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def final_val(run: Path) -> dict[str, float]:
    """The last logged value of each val/ metric in the run's CSV logs (a resumed run has several versions)."""
    out: dict[str, float] = {}
    for path in sorted(run.glob("csv/version_*/metrics.csv")):
        for row in csv.DictReader(open(path)):
            out.update({k: float(v) for k, v in row.items() if k.startswith("val/") and v})
    return out


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The model's (and its EMA's) tensors. Metric states are left out: an uninterrupted run's last.ckpt is written
    at the final step before the last validation and not again (same global step), a resumed run's after it."""
    state = load_checkpoint(ckpt)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith(("net.", "ema."))}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, data_dir) -> Path:
    """One uninterrupted single-process run, logged to CSV and to W&B offline."""
    tmp = tmp_path_factory.mktemp("ref")
    run = tmp / "run"
    train(tmp, data_dir, "logger=[csv,wandb]", f"hydra.run.dir={run}")
    return run


# --- fast checks ------------------------------------------------------------------------------------------------


def test_atomic_checkpoint_survives_a_failed_write(tmp_path, monkeypatch) -> None:
    """A save that dies half-way (here torch.save raising after writing some bytes) leaves the old file intact."""
    from vision_mamba import checkpointing

    io = checkpointing.SafeCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def dying_save(obj, f, *a, **k):
        f.write(b"partial-garbage")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(checkpointing.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"], "a temporary file was left behind"


def test_atomic_checkpoint_survives_sigkill_mid_write(tmp_path) -> None:
    """SIGKILL a process while it writes a big checkpoint over last.ckpt: last.ckpt is still the old, loadable one."""
    path = tmp_path / "last.ckpt"
    script = (
        "import sys, torch; from vision_mamba.checkpointing import SafeCheckpointIO as A\n"
        f"p = {str(path)!r}; A().save_checkpoint({{'step': 1}}, p); print('ready', flush=True)\n"
        "A().save_checkpoint({'step': 2, 'big': torch.ones(32, 1024, 1024)}, p)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env())
    assert proc.stdout.readline().strip() == "ready"
    deadline = time.time() + 60
    while not list(tmp_path.glob(".last.ckpt.tmp-*")) and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(tmp_path.glob(".last.ckpt.tmp-*")), "the kill did not land during the write"
    assert torch.load(path, weights_only=True)["step"] == 1


def test_non_finite_loss_stops_with_a_clear_message() -> None:
    from types import SimpleNamespace

    from vision_mamba.callbacks.nonfinite import NonFiniteLossError, StopOnNonFiniteLoss

    trainer = SimpleNamespace(
        world_size=1, global_step=41, current_epoch=2, fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_idx=6)),
        checkpoint_callback=SimpleNamespace(last_model_path="/runs/x/checkpoints/last.ckpt"),
    )
    cb = StopOnNonFiniteLoss()
    cb.on_before_backward(trainer, None, torch.tensor(2.3))  # finite: nothing happens
    with pytest.raises(NonFiniteLossError) as info:
        cb.on_before_backward(trainer, None, torch.tensor(float("nan")))
    msg = str(info.value)
    assert "step 41" in msg and "last.ckpt" in msg and "base_lr" in msg and "gradient_clip_val" in msg
    assert info.value.user_error  # printed without a traceback by the entry point


def test_run_folder_is_pinned_for_torchrun_and_slurm() -> None:
    from vision_mamba.utils.hydra_callbacks import pin_run_id_from_launcher

    assert pin_run_id_from_launcher({}) is None
    e = {"TORCHELASTIC_RUN_ID": "abc", "WORLD_SIZE": "4"}
    assert pin_run_id_from_launcher(e) == "torchrun_abc" and e["VIM_RUN_ID"] == "torchrun_abc"
    assert pin_run_id_from_launcher({"SLURM_JOB_ID": "77", "SLURM_NTASKS": "8"}) == "slurm_77"
    assert pin_run_id_from_launcher({"VIM_RUN_ID": "mine", "SLURM_JOB_ID": "77", "SLURM_NTASKS": "8"}) == "mine"


def test_scale_configs_compose(monkeypatch) -> None:
    from helpers import compose_config
    from omegaconf import OmegaConf

    monkeypatch.setenv("VIM_RUN_ID", "fixed")
    cfg = compose_config("train.yaml", ["logger=wandb"])
    assert cfg.logger.wandb.project and cfg.logger.wandb.log_model is False
    assert OmegaConf.select(cfg, "hydra.run.dir").endswith("/runs/fixed")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    cfg = compose_config("train.yaml", ["trainer=slurm"])
    assert cfg.trainer.devices == 4 and cfg.trainer.num_nodes == 2 and cfg.trainer.strategy == "ddp"
    import hydra

    env_plugin = hydra.utils.instantiate(cfg.trainer.plugins[0])
    assert env_plugin.auto_requeue and env_plugin.requeue_signal == signal.SIGUSR1
    grid = compose_config("train.yaml", ["hparams_search=digits_grid"])
    assert grid.hydra.sweeper.params["task.base_lr"] == "1e-3,2e-3,4e-3"
    # the Optuna config is only loaded when selected; without the plugin that selection fails, nothing else
    try:
        import hydra_plugins.hydra_optuna_sweeper  # noqa: F401
    except ImportError:
        with pytest.raises(Exception, match="optuna"):
            compose_config("train.yaml", ["hparams_search=digits_optuna"])
    else:
        assert compose_config("train.yaml", ["hparams_search=digits_optuna"]).hydra.sweeper.direction == "maximize"


def test_multirun_summary_callback_writes_rows(tmp_path) -> None:
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from vision_mamba.utils.hydra_callbacks import MultirunSummary

    cb = MultirunSummary()
    cb.on_multirun_start(OmegaConf.create({}))
    for num, lr, value in ((0, "1e-3", 0.5), (1, "2e-3", 0.75)):
        cfg = OmegaConf.create({"optimized_metric": "val/acc1_best", "hydra": {
            "mode": "MULTIRUN", "job": {"num": num}, "runtime": {"output_dir": str(tmp_path / str(num))},
            "sweep": {"dir": str(tmp_path)}}})
        ret = SimpleNamespace(status=SimpleNamespace(name="COMPLETED"), _return_value=value, overrides=[f"task.base_lr={lr}"])
        cb.on_job_end(cfg, ret)
    rows = list(csv.DictReader(open(tmp_path / "summary.csv")))
    assert [(r["task.base_lr"], float(r["value"])) for r in rows] == [("1e-3", 0.5), ("2e-3", 0.75)]


# --- end to end through src/train.py ------------------------------------------------------------------------------


@pytest.mark.slow
def test_wandb_offline_run_has_the_resolved_config_and_syncs(reference_run) -> None:
    offline = list(reference_run.glob("wandb/offline-run-*"))
    assert len(offline) == 1, offline
    run_id = (reference_run / "wandb_run_id.txt").read_text().strip()
    assert offline[0].name.endswith(run_id)
    blob = next(offline[0].glob("*.wandb")).read_bytes()
    # the resolved config: a command-line override and an interpolation already turned into its value
    assert b'"scan_backend":"torch"' in blob and str(reference_run).encode() in blob
    proc = subprocess.run([str(Path(sys.executable).parent / "wandb"), "sync", "--dry-run", str(offline[0])],
                          capture_output=True, text=True, env=env(), timeout=120)
    assert proc.returncode == 0 and "Would sync 1 run" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_one_process(tmp_path, data_dir, reference_run) -> None:
    """trainer=ddp_cpu (Lightning re-launches train.py for rank 1): one run folder, one banner, same val metrics."""
    proc = train(tmp_path, data_dir, "trainer=ddp_cpu", "logger=csv")
    runs = list((tmp_path / "train" / "runs").iterdir())
    assert len(runs) == 1, f"DDP children must write into the parent's folder, got {runs}"
    assert proc.stdout.count("vision-mamba | model") + proc.stderr.count("vision-mamba | model") == 1
    single, ddp = final_val(reference_run), final_val(runs[0])
    assert ddp["val/acc1"] == pytest.approx(single["val/acc1"], abs=1 / 360 + 1e-6)
    assert ddp["val/loss"] == pytest.approx(single["val/loss"], abs=2e-3)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_ends_like_the_uninterrupted_run(tmp_path, data_dir, reference_run) -> None:
    run = tmp_path / "run"
    cmd = [*TRAIN, f"paths.log_dir={tmp_path}", f"paths.data_dir={data_dir}", *FAST, "logger=csv", f"hydra.run.dir={run}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    try:
        while time.time() < deadline:  # wait until a checkpoint from the middle of epoch 1 exists (step 5 of 8)
            if last.is_file() and load_checkpoint(last)["global_step"] >= 5:
                break
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    ckpt = load_checkpoint(last)
    loader_state = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert 5 <= ckpt["global_step"] < 8 and loader_state["epoch"] == 1 and 0 < loader_state["consumed"] < 4, (
        "the kill should land mid-epoch", ckpt["global_step"], loader_state)

    train(tmp_path, data_dir, "logger=csv", f"hydra.run.dir={run}", "ckpt_path=last")
    resumed, uninterrupted = weights(last), weights(reference_run / "checkpoints" / "last.ckpt")
    assert load_checkpoint(last)["global_step"] == 8
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0, msg=f"{name} differs after resume")
    assert final_val(run)["val/acc1"] == final_val(reference_run)["val/acc1"]
    assert final_val(run)["val/loss"] == final_val(reference_run)["val/loss"]


def test_resume_from_a_folder_without_checkpoints_is_a_user_error(tmp_path) -> None:
    """Lightning would warn and silently train from scratch in a new folder; we stop with the fix instead."""
    from train import check_ckpt_path
    from vision_mamba.utils.errors import UserError

    with pytest.raises(UserError, match="hydra.run.dir=<the run folder> ckpt_path=last"):
        check_ckpt_path("last", str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    check_ckpt_path("last", str(tmp_path))


@pytest.mark.slow
def test_multirun_two_values_gives_two_runs_a_summary_and_the_notebooks_run(tmp_path, data_dir, reference_run) -> None:
    sweep = tmp_path / "sweep"
    train(tmp_path, data_dir, "-m", "trainer.max_epochs=1", "trainer.limit_val_batches=2", "logger=csv",
          "task.base_lr=1e-3,4e-3", f"hydra.sweep.dir={sweep}")
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [r["task.base_lr"] for r in rows] == ["0.001", "0.004"] and all(r["status"] == "COMPLETED" for r in rows)
    for row in rows:  # the value each job returned is the metric it logged
        assert float(row["value"]) == pytest.approx(final_val(sweep / row["job"])["val/acc1_best"])

    execute_notebook(ROOT / "notebooks" / "analyse_runs.ipynb", VIM_RUN_DIR=str(sweep))
    assert (sweep / "analysis_curves.png").is_file() and (sweep / "analysis_hparams.png").is_file()
    execute_notebook(ROOT / "notebooks" / "analyse_runs.ipynb", VIM_RUN_DIR=str(reference_run))  # one run, W&B offline

    results = tmp_path / "results"
    results.mkdir()
    (results / "backbones_test.json").write_text(json.dumps({"environment": {"card": "test"}, "rows": [
        {"model": "vim_tiny", "mode": "inference", "img_size": s, "batch": 8, "images_per_s": 1000 / s, "peak_mem_gib": s / 100}
        for s in (224, 448)]}))
    execute_notebook(ROOT / "notebooks" / "benchmarks.ipynb", VIM_RESULTS_DIR=str(results))
    assert (results / "benchmarks.png").is_file()
    empty = tmp_path / "no_results"
    empty.mkdir()
    execute_notebook(ROOT / "notebooks" / "benchmarks.ipynb", VIM_RESULTS_DIR=str(empty))  # robust to missing files


def execute_notebook(path: Path, **environ: str) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{path.name} is stored with outputs"
    old = {k: os.environ.get(k) for k in environ}
    os.environ.update(environ)  # the kernel inherits the environment
    try:
        nbclient.NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
