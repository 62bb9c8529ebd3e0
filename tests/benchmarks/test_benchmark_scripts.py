"""The benchmark scripts: each one's smoke run (--quick, CPU) writes the one record schema with the figures it is
meant to hold, records merge or replace as documented, the README's figures are the records', and the notebook
draws them."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
ENVIRONMENT = {"card", "torch", "triton", "cuda", "python", "commit", "dirty", "source_hash", "command", "date",
               "host_cpu", "cpu_count", "runs"}  # fmt: skip


def script(name: str):
    """benchmarks/<name>.py as a module (the scripts import their neighbours by name)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


def head_commit() -> str | None:
    if not (ROOT / ".git").exists():
        return None
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


def record(path: Path, benchmark: str, card: str = "cpu") -> dict:
    """The record at `path`, checked against the schema every script shares; no part of it failed."""
    data = json.loads(path.read_text())
    assert set(data) <= {"benchmark", "environment", "rows", "summary"} and data["benchmark"] == benchmark
    env = data["environment"]
    assert ENVIRONMENT <= env.keys(), ENVIRONMENT - env.keys()
    assert (env["card"] == "cpu") == (card == "cpu") and path.name == f"{benchmark}_{card}.json"
    if head_commit():
        assert env["commit"] == head_commit() and isinstance(env["dirty"], bool)
    assert data["rows"] and not [k for r in data["rows"] for k in r if k.endswith("error")]
    return data


def write_csv_log(run: Path, column: str, rates: list[float]) -> None:
    """A CSVLogger metrics.csv as ThroughputMonitor fills it: loss rows and rate rows interleaved."""
    log = run / "csv" / "version_0"
    log.mkdir(parents=True)
    lines = "".join(f"{i},1.0,\n{i},,{r}\n" for i, r in enumerate(rates))
    (log / "metrics.csv").write_text(f"step,train/loss_step,{column}\n{lines}")


def smoke_runs(folder: Path) -> dict:
    """Each script's smoke run (CPU, tiny), writing its record into `folder`."""
    out = ["--out", str(folder)]
    quick = ["--device", "cpu", "--quick", *out]
    # DDP: medians of the second halves are 100 alone and 180 on two GPUs
    write_csv_log(folder / "ddp" / "one", "train/device/samples_per_sec", [5, 90, 100, 110, 95])
    write_csv_log(folder / "ddp" / "two", "train/samples_per_sec", [7, 170, 180, 175, 185])
    return {
        "scan": lambda: script("scan").main(quick),
        # a second invocation on the same code adds its rows to the same record
        "backbones": lambda: [script("backbones").main([*quick, "--models", "vim_tiny", "deit_tiny_fused", "--modes", "eager"]),
                              script("backbones").main([*quick, "--models", "vim_tiny", "--modes", "compiled",
                                                        "--compile-backend", "eager", "--parts", "infer", "train"])],
        "profile": lambda: [script("profiler").main(quick), script("profiler").main([*quick, "--scan", "2,16,17", "--routes", "2"])],
        "ab": lambda: [script("ab").main(["extract", "HEAD", str(folder / "ab_base")]),
                       script("ab").main(["run", str(folder / "ab_base"), str(ROOT), "--quick", "--rounds", "1",
                                          "--parts", "scan", *out])],
        "loader": lambda: script("loader").main(["--quick", "--data", str(folder / "loader_data"), *out]),
        "ddp_scaling": lambda: script("ddp_scaling").main([str(folder / "ddp" / "one"), str(folder / "ddp" / "two"),
                                                           "--gpus", "2", *out]),
    }  # fmt: skip


@pytest.fixture(scope="session")
def records(tmp_path_factory) -> Path:
    """Every script's smoke record in one folder, made once per test session (the xdist workers share it): a
    script that fails leaves <benchmark>.failed with its traceback instead."""
    from filelock import FileLock

    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    base = tmp_path_factory.getbasetemp()
    folder = base.parent / f"benchmark_records_{run_id}" if run_id else base / "benchmark_records"
    with FileLock(f"{folder}.lock"):
        if not (folder / "DONE").exists():
            folder.mkdir(exist_ok=True)
            for name, run in smoke_runs(folder).items():
                if name == "ab" and head_commit() is None:
                    continue  # ab.py extract needs a git checkout
                try:
                    run()
                except (Exception, SystemExit):  # noqa: BLE001 - reported by the test of that script
                    (folder / f"{name}.failed").write_text(traceback.format_exc())
            (folder / "DONE").touch()
    return folder


def smoke_record(records: Path, benchmark: str) -> dict:
    failed = records / f"{benchmark}.failed"
    assert not failed.exists(), failed.read_text()
    return record(records / f"{benchmark}_cpu.json", benchmark)


def test_scan_times_every_shape_and_route(records) -> None:
    data = smoke_record(records, "scan")
    cases = {(tuple(r["shape"]), r["routes"], r["backend"]) for r in data["rows"]}
    assert cases == {(s, r, "torch") for s in script("scan").QUICK_SHAPES for r in (1, 2, 4)}
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in data["rows"])


def test_scan_route_index_is_the_models_pattern() -> None:
    # the routes the scan rows time are the model's: each a permutation of the tokens, the second the first reversed
    index = script("scan").route_index(4, 37, "cpu")
    assert index.shape == (4, 37) and all(sorted(r.tolist()) == list(range(37)) for r in index)
    assert index[1].tolist() == index[0].flip(0).tolist() and index[2].tolist() != index[0].tolist()


def test_scan_config_variant_is_passed_to_the_kernels(monkeypatch) -> None:
    # --config chunk=8: both launch configs (forward-only and training) are select_config's with chunk replaced,
    # and the scan call receives them as config=
    import torch
    import vim_kernels

    if not hasattr(vim_kernels, "ScanConfig"):
        pytest.skip("these kernels choose their launch internally (no vim_kernels.ScanConfig)")
    scan = script("scan")
    configs = scan.launch_configs(scan.parse_config("chunk=8"), 2, 128, 384, 197, torch.device("cuda"))
    for phase, grad in (("fwd", False), ("fwd_bwd", True)):
        default = vim_kernels.select_config(128, 384, 2, 197, scan.N_STATE, grad, torch.device("cuda"))
        assert isinstance(configs[phase], vim_kernels.ScanConfig) and configs[phase].chunk == 8
        assert configs[phase] == dataclasses.replace(default, chunk=8)
    seen = {}
    monkeypatch.setattr(vim_kernels, "multi_route_selective_scan", lambda **kw: seen.update(kw))
    scan.ours("triton", 2, "routes", configs["fwd_bwd"])(u="u")
    assert seen["config"] is configs["fwd_bwd"] and seen["routes"] == "routes" and seen["backend"] == "triton"


def test_backbones_rows_per_model_resolution_and_mode(records) -> None:
    data = smoke_record(records, "backbones")
    rows = {(r["model"], r["img_size"], r["mode"]): r for r in data["rows"]}
    assert set(rows) == {("vim_tiny", 32, "eager"), ("deit_tiny_fused", 32, "eager"), ("vim_tiny", 32, "compiled")}
    assert len(data["environment"]["runs"]) == 2
    for r in rows.values():
        assert r["batch"] == 4 and r["infer_images_per_s"] > 0 and r["train_images_per_s"] > 0
        assert r["infer_images_per_s"] == pytest.approx(4e3 / r["infer_ms"])
    assert rows[("vim_tiny", 32, "eager")]["latency_ms_batch1"] > 0
    assert rows[("vim_tiny", 32, "eager")]["lightning_images_per_s"] > 0  # the LightningModule's step ran
    assert "lightning_images_per_s" not in rows[("deit_tiny_fused", 32, "eager")]  # no Hydra config for DeiT


def test_lightning_step_timer_counts_the_steps_it_times(monkeypatch) -> None:
    # steps 0..5 each start 10 ms after the previous one: warm-up 2, 3 timed steps -> 10 ms a step, the first 10 ms
    backbones = script("backbones")
    clock = iter(range(0, 1000, 10))
    monkeypatch.setattr(backbones.time, "perf_counter", lambda: next(clock) / 1e3)
    timer = backbones.StepTimer(warmup=2, iters=3)
    for i in range(6):
        timer.on_train_batch_start(None, None, None, i)
    assert timer.ms == pytest.approx(10.0) and timer.first_step_s == pytest.approx(0.010)


def test_profiler_tables_of_a_model_pass_and_of_the_scan(records) -> None:
    data = smoke_record(records, "profile")
    targets = {r["target"] for r in data["rows"]}
    assert targets == {"vim_tiny 32px batch 2 eager inference", "scan 2,16,17 routes 2 torch forward+backward"}
    for target in targets:
        kernels = [r for r in data["rows"] if r["target"] == target and r["what"] == "kernel"]
        (total,) = [r for r in data["rows"] if r["target"] == target and r["what"] == "total"]
        assert sum(k["ms_per_pass"] for k in kernels) == pytest.approx(total["ms_per_pass"])
        assert sum(k["share"] for k in kernels) == pytest.approx(1.0)


def test_ab_records_both_commits_and_every_round(records) -> None:
    if head_commit() is None:
        pytest.skip("needs a git checkout (ab.py extract)")
    data = smoke_record(records, "ab")
    trees = data["summary"]["trees"]
    assert trees["base"]["commit"] == head_commit() and trees["base"]["dirty"] is False
    assert trees["new"]["commit"] == head_commit() and trees["new"]["dirty"] == data["environment"]["dirty"]
    assert {(r["tree"], r["round"]) for r in data["rows"]} == {("base", 0), ("new", 0)}
    for m in data["summary"]["medians"]:  # times: slowdown = new / base - 1
        base, new = ([r["value"] for r in data["rows"] if r["measure"] == m["measure"] and r["tree"] == t]
                     for t in ("base", "new"))  # fmt: skip
        assert m["slowdown"] == pytest.approx(statistics.median(new) / statistics.median(base) - 1)


def test_ab_slowdown_of_a_rate_is_base_over_new() -> None:
    ab = script("ab")
    rows = [{"tree": t, "round": 0, "measure": "images/s", "value": v, "lower_is_better": False}
            for t, v in (("base", 100.0), ("new", 80.0))]  # fmt: skip
    assert ab.compare(rows, ["base", "new"])[0]["slowdown"] == pytest.approx(0.25)


def test_loader_rate_by_worker_count_over_imagenet_jpegs(records) -> None:
    from PIL import Image

    data = smoke_record(records, "loader")
    assert [(r["workers"], r["images"]) for r in data["rows"]] == [(0, 8), (1, 8)]  # 2 timed batches of 4
    assert all(r["images_per_s"] > 0 for r in data["rows"])
    (root,) = (p for p in (records / "loader_data").iterdir() if p.is_dir())
    jpegs = sorted((root / "train").glob("n*/*.JPEG"))
    assert len({p.parent.name for p in jpegs}) == 2 and (root / "val").is_dir()
    with Image.open(jpegs[0]) as img:
        assert img.format == "JPEG" and img.size == (64, 48)


def test_ddp_scaling_from_two_csv_logs(records) -> None:
    rows = smoke_record(records, "ddp_scaling")["rows"]
    assert [r["images_per_s"] for r in rows] == [100.0, 180.0]
    assert rows[1]["speedup"] == pytest.approx(1.8) and rows[1]["efficiency"] == pytest.approx(0.9)


def test_records_merge_only_on_the_same_code_and_machine(tmp_path, monkeypatch) -> None:
    common = script("common")
    common.write_result("x", [{"k": 1, "v": 1}, {"k": 2, "v": 2}], tmp_path, key=("k",))
    common.write_result("x", [{"k": 2, "v": 20}], tmp_path, key=("k",))
    assert json.loads((tmp_path / "x_cpu.json").read_text())["rows"] == [{"k": 1, "v": 1}, {"k": 2, "v": 20}]
    common.write_result("x", [{"k": 3, "v": 3}], tmp_path)  # no key: replaced
    assert json.loads((tmp_path / "x_cpu.json").read_text())["rows"] == [{"k": 3, "v": 3}]
    common.write_result("x", [{"k": 1, "v": 1}], tmp_path, key=("k",))
    monkeypatch.setattr(
        common, "source_state", lambda root=None: {"commit": "f" * 40, "dirty": False, "source_hash": "0"}
    )
    common.write_result("x", [{"k": 2, "v": 2}], tmp_path, key=("k",))  # other code: the old rows go
    data = json.loads((tmp_path / "x_cpu.json").read_text())
    assert data["rows"] == [{"k": 2, "v": 2}] and len(data["environment"]["runs"]) == 1


def test_quick_runs_never_write_into_the_results(monkeypatch, tmp_path) -> None:
    common = script("common")
    monkeypatch.setattr(common.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path / "results")
    path = common.write_result("x", [{"k": 1}], quick=True)
    assert path.parent == tmp_path / "tmp" / "vim_benchmarks_quick" and not (tmp_path / "results").exists()


def test_a_stamped_copy_knows_its_commit_and_its_changes(tmp_path) -> None:
    common = script("common")
    shutil.copytree(ROOT / "kernels", tmp_path / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    common.write_stamp(tmp_path, "a" * 40, dirty=False)
    assert common.source_state(tmp_path) == {"commit": "a" * 40, "dirty": False,
                                             "source_hash": common.source_hash(tmp_path)}  # fmt: skip
    with open(tmp_path / "kernels" / "__init__.py", "a") as f:
        f.write("# changed after the stamp\n")
    assert common.source_state(tmp_path)["dirty"] is True


@pytest.mark.parametrize(
    ("name", "tag"),
    [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"), ("NVIDIA A100-SXM4-80GB", "a100"),
     ("NVIDIA GeForce RTX 4090", "rtx4090"), ("Tesla T4", "t4")],
)  # fmt: skip
def test_card_tags(name, tag) -> None:
    assert script("common").card_tag(name) == tag


def test_gpu_suite_runs_each_step_with_its_models(tmp_path) -> None:
    # a stand-in Python that logs the commands the suite gives it; the suite's own questions get fixed answers
    calls = tmp_path / "calls"
    stub = tmp_path / "python"
    stub.write_text(f"""#!/usr/bin/env bash
if [ "$1" = -c ]; then case "$2" in *card_tag*) echo h100;; *device_count*) echo 1;; esac; exit 0; fi
echo "$*" >> {calls}
""")
    stub.chmod(0o755)
    env = {**os.environ, "PYTHON": str(stub), "OUT": str(tmp_path / "out")}
    env.pop("AB_BASE", None)
    steps = ["train224:vim_small", "res1248:vim_tiny,deit_tiny_plain", "ab", "ddp", "nonsense"]
    proc = subprocess.run(["bash", str(BENCH / "gpu_suite.sh"), *steps], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = calls.read_text().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("benchmarks/backbones.py") and "--models vim_small --resolutions 224" in lines[0]
    assert "--models vim_tiny deit_tiny_plain --resolutions 1248" in lines[1]
    summary = proc.stdout.split("GPU suite summary")[1]
    for step, status in (("ab", "skipped: set AB_BASE"), ("ddp", "skipped: one GPU"), ("nonsense", "unknown step")):
        assert any(line.startswith(step) and status in line for line in summary.splitlines()), summary
    assert (tmp_path / "out" / "suite.log").is_file()


def test_workers_needed_is_the_fewest_that_feed_the_training_rate() -> None:
    report = script("report")
    env = {"card": "H100"}
    loader = {
        "environment": env,
        "rows": [{"workers": w, "images_per_s": r} for w, r in ((0, 100), (2, 300), (4, 500))],
    }
    backbones = [{"environment": env, "rows": [
        {"model": "vim_tiny", "img_size": 224, "train_images_per_s": 250.0},
        {"model": "vim_tiny", "img_size": 224, "lightning_images_per_s": 200.0},
        {"model": "vim_small", "img_size": 224, "train_images_per_s": 900.0},
        {"model": "vim_small", "img_size": 512, "train_images_per_s": 50.0}]}]  # fmt: skip
    lines = report.workers_needed(loader, backbones)
    assert any("vim_tiny" in x and "needs 2 workers per GPU" in x for x in lines)
    assert any("vim_small" in x and "more than the 4 workers measured" in x for x in lines)


def test_report_renders_the_records_and_the_notebook_draws_them(records, tmp_path) -> None:
    report = script("report")
    records = shutil.copytree(records, tmp_path / "records", ignore=shutil.ignore_patterns("*_data", "ab_base", "ddp"))
    readme = tmp_path / "README.md"
    readme.write_text(f"# head\n{report.START}\nstale\n{report.END}\ntail\n")
    assert report.main(["--results", str(records), "--readme", str(readme), "--check"]) == 1
    assert report.main(["--results", str(records), "--readme", str(readme), "--plot"]) == 0
    assert (records / report.PLOT).is_file()
    text = readme.read_text()
    assert text.startswith("# head\n") and text.endswith("tail\n") and "stale" not in text
    assert f"results/{report.PLOT}" in text
    for name in ("scan", "backbones", "profile", "ab", "loader", "ddp_scaling"):
        assert f"`results/{name}_cpu.json`" in text
    rows = json.loads((records / "loader_cpu.json").read_text())["rows"]
    assert f"| 1 | 4 | {rows[1]['images_per_s']:.3g} |" in text
    assert report.main(["--results", str(records), "--readme", str(readme), "--check"]) == 0


def test_report_without_records_says_so(tmp_path) -> None:
    assert "No records" in script("report").render(tmp_path)


def test_the_readme_figures_are_the_records() -> None:
    assert script("report").main(["--check"]) == 0, "run python benchmarks/report.py"
