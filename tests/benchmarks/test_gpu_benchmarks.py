"""On a GPU: each benchmark script's smoke run on CUDA (Triton, compiled modes, CUDA graphs, memory records), and a
short training run of Vim through src/train.py that learns and whose trained logits match the sequential reference."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from helpers import ROOT, as_job, compose_config
from omegaconf import open_dict
from test_benchmark_scripts import head_commit, record, script

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def card() -> str:
    return script("common").card_tag()


def test_scan_times_ours_and_the_torch_backend(tmp_path) -> None:
    data = record(script("scan").main(["--quick", "--out", str(tmp_path)]), "scan", card())
    assert {r["backend"] for r in data["rows"]} >= {"triton", "torch"}
    assert all(r["fwd_gpu_ms"] > 0 and r["fwd_bwd_gpu_ms"] > 0 for r in data["rows"])


def test_backbones_in_every_mode_with_memory(tmp_path) -> None:
    path = script("backbones").main(["--quick", "--out", str(tmp_path), "--models", "vim_tiny", "deit_tiny_fused",
                                     "--modes", "eager", "compiled", "compiled-cudagraphs"])  # fmt: skip
    rows = {(r["model"], r["mode"]): r for r in record(path, "backbones", card())["rows"]}
    assert len(rows) == 6
    for r in rows.values():
        assert r["infer_peak_mem_gib"] > 0 and r["train_peak_mem_gib"] > 0 and r["latency_ms_batch1"] > 0
    for mode in ("eager", "compiled"):  # the LightningModule's step, eager and with task.compile=true
        assert rows[("vim_tiny", mode)]["lightning_images_per_s"] > 0
        assert rows[("vim_tiny", mode)]["lightning_peak_mem_gib"] > 0


def test_profiler_memory_at_the_peak_of_a_training_step(tmp_path) -> None:
    path = script("profiler").main(["--quick", "--train", "--memory", "--out", str(tmp_path)])
    rows = record(path, "profile", card())["rows"]
    (total,) = [r for r in rows if r["what"] == "total"]
    alive = [r for r in rows if r["what"] == "alive_at_peak"]
    assert total["peak_mib"] > total["before_pass_mib"] and alive
    assert sum(r["mib"] for r in alive) == pytest.approx(total["peak_mib"] - total["before_pass_mib"])


def test_ab_alternates_two_trees_on_the_gpu(tmp_path) -> None:
    if head_commit() is None:
        pytest.skip("needs a git checkout (ab.py extract)")
    ab = script("ab")
    ab.main(["extract", "HEAD", str(tmp_path / "base")])
    path = ab.main(["run", str(tmp_path / "base"), str(ROOT), "--quick", "--rounds", "2", "--out", str(tmp_path)])
    data = record(path, "ab", card())
    assert {(r["tree"], r["round"]) for r in data["rows"]} == {(t, n) for t in ("base", "new") for n in (0, 1)}
    measures = {m["measure"] for m in data["summary"]["medians"]}
    assert any("inference images/s" in m for m in measures) and any("training peak GiB" in m for m in measures)


def test_loader_pins_memory_where_cuda_is(tmp_path) -> None:
    path = script("loader").main(["--quick", "--data", str(tmp_path / "data"), "--out", str(tmp_path)])
    assert all(r["pin_memory"] for r in record(path, "loader", card())["rows"])


def test_training_run_learns_and_its_logits_match_the_reference_scan(tmp_path, data_dir) -> None:
    """Vim-Ti through src/train.py on the embedded digits at 224 px (bf16, Triton): the loss falls and the
    validation accuracy rises far above chance (10%); the trained model's float32 logits with the Triton scan
    match the sequential reference scan's."""
    from train import train

    cfg = compose_config("train.yaml", ["model=vim_tiny", "data=digits", "data.img_size=224", "data.batch_size=64",
                                        "data.num_workers=4", "trainer=gpu", "trainer.max_epochs=8", "logger=csv",
                                        "callbacks=none", "test=false", "extras.print_config=false"])  # fmt: skip
    with open_dict(cfg):
        cfg.paths.root_dir, cfg.paths.data_dir = str(ROOT), str(data_dir)
        cfg.paths.log_dir = cfg.paths.output_dir = str(tmp_path)
    metrics, objects = train(as_job(cfg))
    log = pd.read_csv(next(tmp_path.rglob("metrics.csv")))
    losses = log["train/loss_step"].dropna().to_numpy()
    k = max(1, len(losses) // 10)
    assert losses[-k:].mean() < 0.7 * losses[:k].mean(), losses
    assert float(metrics["val/acc1_best"]) > 0.8

    net = objects["model"].net.eval()
    x = torch.randn(8, 3, 224, 224, device="cuda")
    logits = {}
    for backend in ("triton", "ref"):
        net.set_scan_backend(backend)
        with torch.no_grad():
            logits[backend] = net(x).float()
    assert ((logits["triton"] - logits["ref"]).norm() / logits["ref"].norm()).item() < 1e-3
