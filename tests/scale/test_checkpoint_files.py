"""Checkpoint files from outside: a hostile pickle never runs, and a file that cannot be loaded is one error line."""

from __future__ import annotations

import builtins
import io
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from collections import OrderedDict
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, compose_config, make_fast, run_train
from lightning.fabric.utilities.data import AttributeDict
from omegaconf import OmegaConf

from vision_mamba.checkpointing import CheckpointError, SafeCheckpointIO, load_checkpoint
from vision_mamba.models.checkpoints import read_state_dict

# what every subprocess run needs besides its checkpoint arguments: the digits at 16 px, no workers, no config print
RUN = ["trainer.accelerator=cpu", "data.num_workers=0", "data.persistent_workers=false", "data.img_size=16",
       "model.scan_backend=torch", "extras.print_config=false", "trainer.max_epochs=1", "trainer.limit_train_batches=1",
       "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]


class SystemCall:
    """Unpickling this runs ``touch <marker>`` (os.system, pickled as posix.system)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class Exec:
    """Unpickling this runs Python code that creates ``marker`` (builtins.exec)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.fixture(scope="module")
def run_checkpoint(tmp_path_factory, data_dir) -> Path:
    """A real checkpoint of train.py (in-process, 2 steps): vim_digits at 16 px with depth 2."""
    tmp = tmp_path_factory.mktemp("run")
    cfg = compose_config("train.yaml", ["data.img_size=16", "model.scan_backend=torch", "+model.depth=2"])
    run_train(make_fast(cfg, tmp, data_dir))
    return tmp / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, run_checkpoint) -> dict[str, Path]:
    """A bare pickle whose unpickling runs a shell command (torch's legacy format is a bare pickle), and a real
    checkpoint of this project with one booby-trapped entry added (torch's zip format). Both would create
    ``marker``."""
    tmp = tmp_path_factory.mktemp("hostile")
    marker = tmp / "MARKER"
    with open(tmp / "system.ckpt", "wb") as f:
        pickle.dump({"state_dict": {}, "payload": SystemCall(marker)}, f, protocol=2)
    ckpt = load_checkpoint(run_checkpoint)
    ckpt["callbacks"]["Exec"] = Exec(marker)
    torch.save(ckpt, tmp / "trapped.ckpt")
    return {"marker": marker, "system.ckpt": tmp / "system.ckpt", "trapped.ckpt": tmp / "trapped.ckpt"}


def run_script(script: str, args: list[str], tmp: Path, data_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "VIM_ROOT": str(tmp), "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    env.pop("VIM_RUN_ID", None)
    cmd = [sys.executable, str(ROOT / "src" / script), f"paths.data_dir={data_dir}", *RUN, *args]
    return subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)


def assert_one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    out = proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in out, (proc.returncode, out[-4000:])
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


# --- through the entry points (subprocesses) ---------------------------------------------------------------------


ENTRY_POINTS = {
    "train.py ckpt_path": ("train.py", "ckpt_path={}"),
    "eval.py ckpt_path": ("eval.py", "ckpt_path={}"),
    "train.py model.pretrained": ("train.py", "model.pretrained={}"),
    "eval.py model.pretrained": ("eval.py", "model.pretrained={}"),
}
GLOBALS = {"system.ckpt": "posix.system", "trapped.ckpt": "builtins.exec"}
# Every entry point gets a bare pickle, which only the weights_only unpickler behind it refuses (Lightning's restore
# through SafeCheckpointIO for ckpt_path, read_state_dict for model.pretrained); the trapped real checkpoint is
# refused by the up-front file check, before any data or model is built (the two kinds are also crossed in-process
# by test_the_unpickler_refuses_what_the_file_check_would_let_through).
CASES = [(entry, "system.ckpt") for entry in ENTRY_POINTS] + [("train.py ckpt_path", "trapped.ckpt")]


@pytest.mark.parametrize(("entry", "name"), CASES)
def test_hostile_checkpoint_never_runs(entry: str, name: str, hostile, tmp_path, data_dir) -> None:
    """Every entry point that loads a file: one `error:` line naming the global, exit 2, no marker file."""
    script, arg = ENTRY_POINTS[entry]
    args = [arg.format(hostile[name])]
    if script == "eval.py" and "pretrained" in arg:
        args.append("ckpt_path=null")
    proc = run_script(script, args, tmp_path, data_dir)
    assert not hostile["marker"].exists(), f"{entry}={name} ran the pickled code"
    assert_one_error_line(proc, name, GLOBALS[name], "refused")
    if entry == "train.py ckpt_path" and name == "trapped.ckpt":
        assert "Instantiating datamodule" not in proc.stdout + proc.stderr, "refused only after building the run"


@pytest.mark.parametrize("kind", ["text", "truncated", "other variant"])
@pytest.mark.parametrize("script", ["train.py", "eval.py"])
def test_a_checkpoint_that_does_not_fit_is_one_line(script: str, kind: str, run_checkpoint, tmp_path, data_dir) -> None:
    path = tmp_path / "given.ckpt"
    args = [f"ckpt_path={path}"]
    if kind == "text":
        path.write_text("not a checkpoint\n")
        needles = ["given.ckpt: not a readable torch checkpoint: a text file (it begins 'not a checkpoint')"]
    elif kind == "truncated":
        data = run_checkpoint.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        needles = ["given.ckpt: not a readable torch checkpoint: truncated or damaged"]
    else:  # the checkpoint is a depth-2 vim_digits with embed 64; this run builds depth 4 with embed 32
        shutil.copy(run_checkpoint, path)
        args.append("+model.embed_dim=32")
        needles = ["given.ckpt: checkpoint of a vim_digits (embed 64, depth 2, 10 classes), this run builds a "
                   "vim_digits (embed 32, depth 4, 10 classes):", "tensors differ in shape, e.g. net.", "missing"]
    line = assert_one_error_line(run_script(script, args, tmp_path, data_dir), *needles)
    assert len(line) < 1000, "one readable line, not a list of every tensor"


# --- the loader itself -------------------------------------------------------------------------------------------


def test_hostile_pickles_are_refused_naming_the_global(tmp_path, run_checkpoint) -> None:
    marker = tmp_path / "MARKER"
    for protocol in (2, 4, 5):  # 4 and 5 address globals through the stack and memo, not by name
        path = tmp_path / f"protocol{protocol}.pth"
        path.write_bytes(pickle.dumps({"model": {}, "x": SystemCall(marker)}, protocol=protocol))
        with pytest.raises(CheckpointError, match=rf"protocol{protocol}\.pth: holds posix\.system; only tensors"):
            load_checkpoint(path)
    # a torch zip archive whose pickle record uses instructions torch.save never writes
    archive = io.BytesIO()
    torch.save({"w": torch.ones(2)}, archive)
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(tmp_path / "crafted.pt", "w") as dst:
        for name in src.namelist():
            data = pickle.dumps({"x": Exec(marker)}, protocol=4) if name.endswith("data.pkl") else src.read(name)
            dst.writestr(name, data)
    with pytest.raises(CheckpointError, match=r"crafted\.pt: holds builtins\.exec"):
        load_checkpoint(tmp_path / "crafted.pt")
    assert not marker.exists()


def test_the_unpickler_refuses_what_the_file_check_would_let_through(tmp_path, hostile, monkeypatch) -> None:
    """load_checkpoint's torch.load is weights_only on its own: with the up-front file check gone, still refused."""
    import vision_mamba.models.checkpoints as checkpoints

    monkeypatch.setattr(checkpoints, "check_checkpoint_file", lambda path: None)
    for name, global_name in {"system.ckpt": "posix.system", "trapped.ckpt": "exec"}.items():  # torch's names
        with pytest.raises(CheckpointError, match=rf"{name}: holds {global_name}; only tensors"):
            load_checkpoint(hostile[name])
    assert not hostile["marker"].exists()


@pytest.mark.parametrize("kind", ["folder", "missing", "empty", "text", "truncated", "binary"])
def test_unreadable_files_are_one_line(kind: str, tmp_path, run_checkpoint) -> None:
    path = tmp_path / "x.ckpt"
    if kind == "folder":
        (tmp_path / "run" / "checkpoints").mkdir(parents=True)
        shutil.copy(run_checkpoint, tmp_path / "run" / "checkpoints" / "last.ckpt")
        path, expected = tmp_path / "run", r"is a folder, not a checkpoint file \(did you mean .*last\.ckpt\?\)"
    elif kind == "missing":
        expected = "no such file"
    elif kind == "empty":
        path.write_bytes(b"")
        expected = r"empty \(0 bytes"
    elif kind == "text":
        path.write_text("epoch: 3\nval/acc1: 0.9\n")
        expected = "a text file \\(it begins 'epoch: 3'\\)"
    elif kind == "truncated":
        data = run_checkpoint.read_bytes()
        path.write_bytes(data[: len(data) * 2 // 3])
        expected = rf"truncated or damaged \({len(data) * 2 // 3} bytes"
    else:
        path.write_bytes(bytes(range(256)))
        expected = "an unknown format"
    with pytest.raises(CheckpointError, match=expected) as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_project_checkpoints_load_with_weights_only(run_checkpoint) -> None:
    """What train.py writes (hyper-parameters, RNG states, loops, callbacks) is plain data: torch's own loader with
    weights_only=True and no allow-list reads it."""
    ckpt = torch.load(run_checkpoint, map_location="cpu", weights_only=True)
    assert isinstance(ckpt["hyper_parameters"]["schedule"], dict)
    assert isinstance(ckpt["datamodule_hyper_parameters"]["mean"], list)
    assert isinstance(ckpt["callbacks"]["ExactResume"]["rng"]["numpy"]["keys"], torch.Tensor)


def test_a_run_checkpoint_is_a_pretrained_source(run_checkpoint) -> None:
    """model.pretrained=<run>/checkpoints/*.ckpt gives the run's `net.` weights (not the EMA copy)."""
    state = read_state_dict(run_checkpoint)
    net = {k.removeprefix("net."): v for k, v in load_checkpoint(run_checkpoint)["state_dict"].items() if k.startswith("net.")}
    assert state.keys() == net.keys() and all(torch.equal(state[k], net[k]) for k in net)
    lightning_like = {"pytorch-lightning_version": "2.6", "state_dict": {"net.w": torch.zeros(1), "ema.module.w": torch.ones(1)}}
    path = run_checkpoint.parent / "with_ema.ckpt"
    torch.save(lightning_like, path)
    assert list(read_state_dict(path)) == ["w"] and read_state_dict(path)["w"].item() == 0.0


# --- the checkpoint-IO plugin ------------------------------------------------------------------------------------


def test_checkpoint_io_writes_plain_data(tmp_path) -> None:
    io_plugin, path = SafeCheckpointIO(), tmp_path / "last.ckpt"
    io_plugin.save_checkpoint({
        "hyper_parameters": AttributeDict(schedule=OmegaConf.create({"kind": "cosine", "steps": [1, 2]}),
                                          segmentor=partial(OrderedDict, channels=OmegaConf.create([4]))),
        "rng": np.arange(3, dtype=np.uint32), "epoch": np.int64(4), "state_dict": OrderedDict(w=torch.ones(2)),
    }, path)
    ckpt = torch.load(path, weights_only=True)
    # hyper-parameters are a record: what cannot be plain data is kept as its repr (a task's head factory, say)
    assert ckpt["hyper_parameters"] == {"schedule": {"kind": "cosine", "steps": [1, 2]},
                                        "segmentor": "functools.partial(<class 'collections.OrderedDict'>, channels=[4])"}
    assert type(ckpt["hyper_parameters"]) is dict and type(ckpt["state_dict"]) is OrderedDict
    assert ckpt["rng"].tolist() == [0, 1, 2] and ckpt["rng"].dtype == torch.uint32 and ckpt["epoch"] == 4
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask()), "a checkpoint honours the umask"
    with pytest.raises(TypeError, match=r"would hold \['pathlib.PurePosixPath'\]"):
        io_plugin.save_checkpoint({"epoch": 5, "where": __import__("pathlib").PurePosixPath("x")}, path)
    assert torch.load(path, weights_only=True)["epoch"] == 4, "a refused save must leave the previous file"
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"], "a temporary file was left behind"
    assert io_plugin.load_checkpoint(path)["epoch"] == 4


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
