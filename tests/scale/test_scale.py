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
    "callbacks.rich_progress_bar=null", "task.ema_decay=0.9",
]
# 2 epochs of 4 steps: global steps 1-4 are epoch 0, 5-8 epoch 1. With a model EMA (the ImageNet recipe's, faster),
# so every checkpoint must hold the EMA of the weights it holds


def env() -> dict[str, str]:
    e = dict(os.environ)
    # one thread per process: on a shared 2-core machine, more threads only contend
    e.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true", HYDRA_FULL_ERROR="1")
    e.pop("VIM_RUN_ID", None)
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "tests" / "scale"), e.get("PYTHONPATH")]))  # stall.py
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
        checkpoint_callbacks=[SimpleNamespace(best_model_path="", last_model_path="/runs/x/checkpoints/last.ckpt")],
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


def test_eval_builds_its_trainer_like_train(tmp_path, data_dir, monkeypatch) -> None:
    """eval.py's trainer gets the plugins of the trainer config (trainer=slurm's SLURMEnvironment, here with SIGUSR2
    so that Lightning's own SLURM detection cannot stand in for it) and the safe checkpoint IO, like train.py's
    (both through vision_mamba.trainer.build_trainer)."""
    import lightning
    from helpers import as_job, compose_config, make_fast
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from eval import evaluate
    from vision_mamba.checkpointing import SafeCheckpointIO

    for key, value in {"SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS": "1",
                       "SLURM_JOB_ID": "77", "SLURM_JOB_NAME": "vim", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                       "SLURM_NODEID": "0"}.items():
        monkeypatch.setenv(key, value)

    class Built(Exception):
        pass

    def capture(trainer, *args, **kwargs):
        raise Built(trainer)

    monkeypatch.setattr(lightning.Trainer, "test", capture)
    overrides = ["trainer=slurm", "trainer.plugins.0.requeue_signal.value=12", "ckpt_path=x.ckpt", "data.img_size=16"]
    cfg = make_fast(compose_config("eval.yaml", overrides), tmp_path, data_dir)
    with pytest.raises(Built) as built:
        evaluate(as_job(cfg))
    trainer = built.value.args[0]
    environment = trainer._accelerator_connector.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue
    assert environment.requeue_signal == signal.SIGUSR2
    assert isinstance(trainer.strategy.checkpoint_io, SafeCheckpointIO)


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


def stall_at(step: int) -> list[str]:
    """The overrides that make a run wait after optimiser step `step` until it receives a signal (tests/scale/stall.py)."""
    return ["+callbacks.stall._target_=stall.StallAtStep", f"+callbacks.stall.step={step}"]


def start(tmp: Path, data_dir: Path, run: Path, *overrides: str) -> subprocess.Popen:
    cmd = [*TRAIN, f"paths.log_dir={tmp}", f"paths.data_dir={data_dir}", *FAST, f"hydra.run.dir={run}", *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(proc: subprocess.Popen, condition, what: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"never saw {what} (exit {proc.wait()}): {proc.stderr.read()[-3000:]}")
        time.sleep(0.05)


def steps_logged(run: Path) -> int:
    """Training steps the newest CSV log of the run holds (train/loss_step is logged at every step)."""
    logs = sorted(run.glob("csv/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    if not logs:
        return 0
    rows = [row for row in csv.DictReader(open(logs[-1])) if row.get("train/loss_step")]
    return max((int(row["step"]) + 1 for row in rows), default=0)


def first_step_logged(run: Path, version: int) -> int:
    rows = [row for row in csv.DictReader(open(run / "csv" / f"version_{version}" / "metrics.csv")) if row.get("train/loss_step")]
    return min(int(row["step"]) for row in rows) + 1


def assert_ends_like(run: Path, reference_run: Path) -> None:
    last = run / "checkpoints" / "last.ckpt"
    resumed, uninterrupted = weights(last), weights(reference_run / "checkpoints" / "last.ckpt")
    assert load_checkpoint(last)["global_step"] == 8
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0, msg=f"{name} differs after resume")
    assert final_val(run)["val/acc1"] == final_val(reference_run)["val/acc1"]
    assert final_val(run)["val/loss"] == final_val(reference_run)["val/loss"]


@pytest.mark.slow
def test_sigterm_then_kill_9_then_resume_ends_like_the_uninterrupted_run(tmp_path, data_dir, reference_run) -> None:
    """Preempted twice, then finished: the run ends with the uninterrupted run's weights and metrics.

    1. SIGTERM mid-epoch 0, no interval saves (so a mid-epoch last.ckpt can only come from the signal): exit 143, and
       the step running when it arrived finished and is in last.ckpt (the CSV log, flushed every step, counts them).
    2. Resumed with last.ckpt every 3 steps: it starts at the step after the SIGTERM checkpoint; killed -9 after the
       step-6 save (mid-epoch 1).
    3. Resumed again: it starts at step 7 and ends at step 8.
    """
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.ckpt"
    proc = start(tmp_path, data_dir, run, "logger=csv", "+logger.csv.flush_logs_every_n_steps=1",
                 "callbacks.last_checkpoint.every_n_train_steps=null", "callbacks.last_checkpoint.train_time_interval=null")
    wait_for(proc, lambda: steps_logged(run) >= 2, "step 2 in the CSV log")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, proc.stderr.read()[-3000:]
    ckpt = load_checkpoint(last)
    assert ckpt["global_step"] == steps_logged(run), "the checkpoint must hold every step that ran"
    assert 0 < ckpt["global_step"] < 4, f"SIGTERM should land mid-epoch 0, got step {ckpt['global_step']}"
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["consumed"] == ckpt["global_step"]
    sigterm_step = ckpt["global_step"]

    # the process stalls after step 6 (tests/scale/stall.py), so the kill lands there however busy the machine is
    proc = start(tmp_path, data_dir, run, "ckpt_path=last", "callbacks.last_checkpoint.every_n_train_steps=3",
                 *stall_at(6))
    wait_for(proc, lambda: last.is_file() and load_checkpoint(last)["global_step"] >= 6, "last.ckpt at step 6")
    proc.kill()
    proc.wait()
    assert first_step_logged(run, version=1) == sigterm_step + 1, "the resume must start after the SIGTERM step"
    ckpt = load_checkpoint(last)
    loader_state = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert ckpt["global_step"] == 6 and loader_state == {"epoch": 1, "consumed": 2, "exhausted": False}, (
        "the kill should land mid-epoch 1, after the step-6 interval save", ckpt["global_step"], loader_state)

    train(tmp_path, data_dir, f"hydra.run.dir={run}", "ckpt_path=last")
    assert first_step_logged(run, version=2) == 7, "the resumed run must not redo steps the checkpoint holds"
    assert_ends_like(run, reference_run)


@pytest.mark.slow
@pytest.mark.slow
def test_sigterm_on_an_epochs_last_step_validates_that_epoch_then_resume_ends_like_the_uninterrupted_run(
    tmp_path, data_dir, reference_run
) -> None:
    """SIGTERM landing on step 4, epoch 0's last: the epoch's validation runs in full before the run stops (143), the
    checkpoint is the completed epoch's, and the resumed run (which does not validate epoch 0 again) ends with the
    uninterrupted run's weights and metrics."""
    run = tmp_path / "run"
    proc = start(tmp_path, data_dir, run, "logger=csv", *stall_at(3))
    wait_for(proc, lambda: (run / "stalled").is_file(), "the run waiting before step 4")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, proc.stderr.read()[-3000:]
    ckpt = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 4
    assert ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]["completed"] == 1  # the epoch is complete
    rows = list(csv.DictReader(open(run / "csv" / "version_0" / "metrics.csv")))
    assert [r["epoch"] for r in rows if r.get("val/acc1")] == ["0"]  # epoch 0 validated, once

    train(tmp_path, data_dir, f"hydra.run.dir={run}", "ckpt_path=last")
    assert_ends_like(run, reference_run)


def test_sigint_then_resume_with_only_the_run_folder_keeps_the_run(tmp_path, data_dir) -> None:
    """A run with non-default sizes, stopped by Ctrl+C (exit 130, last step saved), resumes from `hydra.run.dir=<run>
    ckpt_path=last` alone: the run's recorded config is composed again (the default one would not fit the
    checkpoint), its .hydra record stays byte-identical, and evaluating the run reports the final validation (eval.py's
    evaluate(), in-process: the eval.py entry point itself runs in tests/scale/test_checkpoint_files.py)."""
    run = tmp_path / "run"
    proc = start(tmp_path, data_dir, run, "logger=csv", "+logger.csv.flush_logs_every_n_steps=1", "+model.depth=2",
                 "task.base_lr=4e-3", *stall_at(5))
    wait_for(proc, lambda: (run / "stalled").is_file(), "the run waiting before step 6")
    proc.send_signal(signal.SIGINT)  # lands on step 6, mid-epoch 1
    assert proc.wait(timeout=120) == 130, proc.stderr.read()[-3000:]
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == steps_logged(run)
    record = {p.name: p.read_bytes() for p in (run / ".hydra").iterdir()}

    resumed = subprocess.run([*TRAIN, f"hydra.run.dir={run}", "ckpt_path=last"], cwd=ROOT, env=env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ckpt = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 8 and ckpt["hyper_parameters"]["base_lr"] == 4e-3
    assert {p.name: p.read_bytes() for p in (run / ".hydra").iterdir() if p.is_file()} == record
    assert len(list((run / ".hydra").glob("resume_*/overrides.yaml"))) == 1

    from helpers import as_job, compose_config

    from eval import adopt_run_config, evaluate

    cfg = as_job(compose_config("eval.yaml", [f"ckpt_path={run}/checkpoints/last.ckpt", f"paths.data_dir={data_dir}",
                                              f"paths.output_dir={tmp_path}/eval", "trainer.accelerator=cpu",
                                              "data.num_workers=0", "data.persistent_workers=false", "~logger"]))
    adopt_run_config(cfg)  # what eval.py's main does with a checkpoint inside a run folder
    tested, _ = evaluate(cfg)
    assert float(tested["test/acc1"]) == final_val(run)["val/acc1"]


def test_slurm_requeue_keeps_working_and_resumes_from_the_step_boundary(tmp_path, data_dir, monkeypatch) -> None:
    """trainer=slurm's auto-requeue, in-process: SIGUSR1 makes Lightning save hpc_ckpt_1 and run `scontrol requeue
    <job>`; the SIGTERM that follows (SLURM ending the job) saves last.ckpt and, for the requeued job, hpc_ckpt_2 at
    the step boundary, and the process exits with 143."""
    from helpers import compose_config, make_fast, run_train
    from omegaconf import open_dict

    from vision_mamba.callbacks.resume import ExactResume

    (tmp_path / "bin").mkdir()
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/scontrol.log\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    for key, value in {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "vim", "SLURM_PROCID": "0",
                       "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}.items():
        monkeypatch.setenv(key, value)
    signals = {1: signal.SIGUSR1, 3: signal.SIGTERM}  # after global steps 1 and 3 (of 2 epochs x 2)
    monkeypatch.setattr(ExactResume, "on_train_batch_end", lambda self, trainer, *args: (
        os.kill(os.getpid(), signals[trainer.global_step]) if trainer.global_step in signals else None))
    cfg = make_fast(compose_config("train.yaml", ["data.img_size=16", "model.scan_backend=torch"]), tmp_path, data_dir)
    with open_dict(cfg):
        cfg.trainer.max_epochs = 2
        cfg.trainer.plugins = [{"_target_": "lightning.pytorch.plugins.environments.SLURMEnvironment", "auto_requeue": True}]
    with pytest.raises(SystemExit) as stopped:
        run_train(cfg)
    assert stopped.value.code == 143
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "77"]
    steps = {p.name: load_checkpoint(p)["global_step"] for p in tmp_path.glob("**/*.ckpt") if "epoch_" not in p.name}
    assert steps == {"hpc_ckpt_1.ckpt": 1, "hpc_ckpt_2.ckpt": 3, "last.ckpt": 3}, steps


def test_a_second_ctrl_c_stops_at_once() -> None:
    from vision_mamba.callbacks import LastCheckpoint

    callback = LastCheckpoint()
    callback._on_signal(signal.SIGINT, None)  # the first one is remembered: stop after this step
    assert callback.received == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
        callback._on_signal(signal.SIGINT, None)


def test_last_ckpt_is_rewritten_at_every_epoch_end_without_a_top_k_save(tmp_path, data_dir, monkeypatch) -> None:
    """With no top-k checkpoint ever saved (save_top_k=0; likewise a metric that stopped improving), last.ckpt still
    holds the end of the previous epoch when the next one starts."""
    from helpers import compose_config, make_fast, run_train
    from omegaconf import open_dict

    from vision_mamba.callbacks.resume import ExactResume

    seen = []
    monkeypatch.setattr(ExactResume, "on_train_epoch_start", lambda self, trainer, module: seen.append(
        load_checkpoint(trainer.default_root_dir + "/checkpoints/last.ckpt")["global_step"] if trainer.current_epoch else 0))
    cfg = make_fast(compose_config("train.yaml", ["data.img_size=16", "model.scan_backend=torch",
                                                  "callbacks.model_checkpoint.save_top_k=0"]), tmp_path, data_dir)
    with open_dict(cfg):
        cfg.trainer.max_epochs = 2
        cfg.trainer.limit_val_batches = 1
        cfg.test = False
    run_train(cfg)
    assert seen == [0, 2] and load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 4
    assert not list((tmp_path / "checkpoints").glob("epoch_*.ckpt"))


def test_resume_from_a_folder_without_checkpoints_is_a_user_error(tmp_path) -> None:
    """Lightning would warn and silently train from scratch in a new folder; we stop with the fix instead."""
    from train import check_ckpt_path
    from vision_mamba.utils.errors import UserError

    with pytest.raises(UserError, match="hydra.run.dir=<the run folder> ckpt_path=last"):
        check_ckpt_path("last", str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    torch.save({"global_step": 0}, tmp_path / "checkpoints" / "last.ckpt")
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
