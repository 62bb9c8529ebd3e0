"""Renders benchmarks/README.md's "Current figures" section from the records in results/, so that the figures shown
are always the recorded ones.

    python benchmarks/report.py           # rewrite the section between its markers
    python benchmarks/report.py --check   # exit 1 when the section differs from the records (a test runs this)
    python benchmarks/report.py --plot    # first redraw results/benchmarks.png (runs notebooks/benchmarks.ipynb)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
RESULTS = HERE / "results"
START, END = "<!-- current-figures:start -->", "<!-- current-figures:end -->"
PLOT = "benchmarks.png"


def load(results: Path) -> dict[str, list[dict]]:
    """The records by benchmark, each list ordered by file name (one file per card)."""
    out: dict[str, list[dict]] = {}
    for path in sorted(results.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"{path} is no readable record: {e}") from e
        if isinstance(record, dict) and {"benchmark", "environment", "rows"} <= record.keys():
            out.setdefault(record["benchmark"], []).append({**record, "file": path.name})
    return out


def num(v, digits: int = 3) -> str:
    """A figure as the tables show it: large rates without decimals, others to `digits` significant figures."""
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def pct(v) -> str:
    return "-" if v is None else f"{100 * v:+.1f}%"


def table(header: Sequence[str], rows: list[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def provenance(record: dict) -> str:
    env = record["environment"]
    commit = (env.get("commit") or "unknown commit")[:10] + (" (uncommitted changes)" if env.get("dirty") else "")
    return (f"`results/{record['file']}`: {env.get('card')}, torch {env.get('torch')}, Triton {env.get('triton')}, "
            f"CUDA {env.get('cuda')}, code {commit}, {(env.get('date') or '')[:10]}")  # fmt: skip


def scan_section(record: dict) -> list[str]:
    by = {}
    for r in record["rows"]:
        by.setdefault((tuple(r["shape"]), r["routes"]), {})[r["backend"]] = r
    rows = []
    for (shape, routes), b in by.items():
        ours, torch_, mamba = b.get("triton", {}), b.get("torch", {}), b.get("mamba_ssm", {})
        rows.append([f"{shape}", str(routes), num(ours.get("fwd_ms")), num(ours.get("fwd_bwd_ms")),
                     num(torch_.get("fwd_bwd_ms")), num(mamba.get("fwd_ms")), num(mamba.get("fwd_bwd_ms"))])  # fmt: skip
    head = [
        "(batch, dim, L)",
        "routes",
        "ours fwd",
        "ours fwd+bwd",
        "torch fwd+bwd",
        "mamba_ssm fwd",
        "mamba_ssm fwd+bwd",
    ]
    return ["Selective scan, ms (CUDA events, bf16):", "", *table(head, rows)]


def backbones_section(record: dict) -> list[str]:
    rows = record["rows"]
    out = []
    train = [r for r in rows if "train_images_per_s" in r or "lightning_images_per_s" in r]
    if train:
        out += ["Training step (forward, cross-entropy, backward, AdamW; bf16 autocast) and the LightningModule's step "
                "as `src/train.py` runs it (Mixup, EMA, metrics):", ""]  # fmt: skip
        out += table(
            ["model", "px", "batch", "mode", "images/s", "peak GiB", "first step s", "Lightning images/s", "Lightning GiB"],
            [[r["model"], str(r["img_size"]), str(r["batch"]), r["mode"], num(r.get("train_images_per_s")),
              num(r.get("train_peak_mem_gib")), num(r.get("train_first_call_s")), num(r.get("lightning_images_per_s")),
              num(r.get("lightning_peak_mem_gib"))] for r in train],
        )  # fmt: skip
        out.append("")
    infer = [r for r in rows if "infer_images_per_s" in r or "latency_ms_batch1" in r]
    if infer:
        out += ["Inference (torch.inference_mode, bf16 autocast):", ""]
        out += table(
            ["model", "px", "batch", "mode", "images/s", "peak GiB", "first call s", "batch-1 ms"],
            [[r["model"], str(r["img_size"]), str(r["batch"]), r["mode"], num(r.get("infer_images_per_s")),
              num(r.get("infer_peak_mem_gib")), num(r.get("infer_first_call_s")), num(r.get("latency_ms_batch1"))]
             for r in infer],
        )  # fmt: skip
        out.append("")
    errors = [
        f"{r['model']} {r['img_size']} {r['mode']}: {k} {v}" for r in rows for k, v in r.items() if k.endswith("_error")
    ]
    if errors:
        out += ["Failed parts:", "", *(f"- {e}" for e in errors), ""]
    return out[:-1] if out and out[-1] == "" else out


def profile_section(record: dict) -> list[str]:
    out = []
    for total in [r for r in record["rows"] if r["what"] == "total"]:
        kernels = [r for r in record["rows"] if r["target"] == total["target"] and r["what"] == "kernel"][:3]
        top = "; ".join(f"{k['name'][:60]} {100 * k['share']:.0f}%" for k in kernels)
        peak = f", peak {num(total['peak_mib'])} MiB" if "peak_mib" in total else ""
        out.append(f"- {total['target']}: {num(total['ms_per_pass'])} ms of {total['name']} per pass{peak}; top: {top}")
    return out


def ab_section(record: dict) -> list[str]:
    trees = record.get("summary", {}).get("trees", {})
    names = " against ".join(f"{n} {(t.get('commit') or '?')[:10]}{' (dirty)' if t.get('dirty') else ''}"
                             for n, t in trees.items())  # fmt: skip
    rounds = len({r["round"] for r in record["rows"]})
    medians = record.get("summary", {}).get("medians", [])
    rows = [[m["measure"], num(m["base_median"], 4), num(m["new_median"], 4), pct(m["slowdown"])] for m in medians]
    return [f"A/B, {names}, {rounds} alternating rounds (medians; slowdown > 0: new slower or larger):", "",
            *table(["measure", "base", "new", "slowdown"], rows)]  # fmt: skip


def workers_needed(loader: dict, backbones: list[dict]) -> list[str]:
    """For each model's fastest training rate at 224 on the loader's card: the fewest workers whose rate covers it."""
    card = loader["environment"].get("card")
    rates = sorted((r["workers"], r["images_per_s"]) for r in loader["rows"] if not r.get("data_overrides"))
    out = []
    for record in (b for b in backbones if b["environment"].get("card") == card):
        best: dict[str, float] = {}
        for r in record["rows"]:
            for k in ("train_images_per_s", "lightning_images_per_s"):
                if r.get("img_size") == 224 and r.get(k):
                    best[r["model"]] = max(best.get(r["model"], 0), r[k])
        for model, need in best.items():
            enough = next((w for w, rate in rates if rate >= need), None)
            verdict = f"{enough} workers" if enough is not None else f"more than the {rates[-1][0]} workers measured"
            out.append(f"- {model} trains at up to {num(need)} images/s at 224 px: the loader needs {verdict} per GPU.")
    return out


def loader_section(record: dict, backbones: list[dict]) -> list[str]:
    rows = [[str(r["workers"]), str(r["batch"]), num(r["images_per_s"]), num(r["first_batch_s"])]
            for r in record["rows"] if not r.get("data_overrides")]  # fmt: skip
    data = record["rows"][0].get("data", "") if record["rows"] else ""
    cores = record["environment"].get("cpu_count")
    out = [f"ImageNet recipe's training loader, {cores} cores ({record['environment'].get('host_cpu')}); {data}:", ""]
    return (
        out + table(["workers", "batch", "images/s", "first batch s"], rows) + ["", *workers_needed(record, backbones)]
    )


def ddp_section(record: dict) -> list[str]:
    rows = [[str(r["gpus"]), num(r["images_per_s"]), num(r["speedup"]), num(r["efficiency"])] for r in record["rows"]]
    return [
        "DDP scaling (train.py on the digits data):",
        "",
        *table(["GPUs", "images/s", "speedup", "efficiency"], rows),
    ]


SECTIONS: dict[str, tuple[str, Callable]] = {
    "scan": ("Scan", scan_section),
    "backbones": ("Backbones", backbones_section),
    "profile": ("Profiles", profile_section),
    "ab": ("A/B", ab_section),
    "loader": ("Data loader", loader_section),
    "ddp_scaling": ("DDP", ddp_section),
}


def render(results: Path) -> str:
    records = load(results)
    if not records:
        return ("No records in `results/` yet: run the suite on a CUDA machine (`bash benchmarks/gpu_suite.sh`), "
                "copy its JSON files into `results/`, then `python benchmarks/report.py --plot`.")  # fmt: skip
    lines = []
    if (results / PLOT).is_file():
        lines += [f"![the newest records of each benchmark](results/{PLOT})", ""]
    for benchmark, (title, section) in SECTIONS.items():
        for record in records.get(benchmark, []):
            args = (record, records.get("backbones", [])) if benchmark == "loader" else (record,)
            lines += [f"### {title}", "", provenance(record), "", *section(*args), ""]
    return "\n".join(lines).rstrip()


def splice(readme: str, body: str) -> str:
    if START not in readme or END not in readme:
        raise SystemExit(f"{README} lacks the markers {START} and {END}")
    head, rest = readme.split(START, 1)
    return f"{head}{START}\n{body}\n{END}{rest.split(END, 1)[1]}"


def plot(results: Path) -> None:
    """Redraw results/benchmarks.png by executing the notebook headless."""
    import os

    import nbclient
    import nbformat

    path = HERE.parent / "notebooks" / "benchmarks.ipynb"
    os.environ["VIM_RESULTS_DIR"] = str(results.resolve())
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, resources={"metadata": {"path": str(path.parent)}}).execute()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--readme", default=str(README))
    p.add_argument("--check", action="store_true", help="compare only; exit 1 when the README is out of date")
    p.add_argument("--plot", action="store_true", help="redraw results/benchmarks.png first (needs nbclient)")
    args = p.parse_args(argv)
    results, readme = Path(args.results), Path(args.readme)
    if args.plot:
        plot(results)
    text = readme.read_text()
    new = splice(text, render(results))
    if args.check:
        if new != text:
            print(f"{readme}'s current figures differ from {results}: run python benchmarks/report.py", file=sys.stderr)
            return 1
        return 0
    readme.write_text(new)
    print(f"written {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
