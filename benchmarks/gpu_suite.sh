#!/usr/bin/env bash
# The GPU suite: the GPU tests and the benchmarks, on any CUDA machine with the project installed (pip install -e .).
#
#   OUT=DIR bash benchmarks/gpu_suite.sh [STEP ...]        no STEP: every step below, in this order
#   a backbones step may name its models: train224:vim_small, res1248:vim_tiny,deit_tiny_fused
#
#   mamba     build mamba_ssm's selective_scan_cuda (tools/mamba_ssm_cuda.py) from MAMBA_SDIST (default: the
#             mamba_ssm-*.tar.gz in .whl/) in the background while `tests` runs, for `scan`; skipped where none
#   tests     pytest -m gpu: every GPU-marked test
#   scan      scan.py: the scan table (ours, torch, and mamba_ssm's kernel where it imports or `mamba` built it)
#   train224  backbones.py: vim_tiny, vim_small training at 224 px batch 128, eager / compiled / CUDA graphs, and
#             the LightningModule's step (eager and task.compile=true)
#   infer224  backbones.py: vim_tiny, vim_small, fused-attention deit_tiny inference at 224 px batch 128 in every
#             mode, and batch-1 latency
#   res1248   backbones.py: vim_tiny and deit_tiny (fused and plain attention) at 1248 px batch 16, eager and compiled
#   sweep     backbones.py: the same three models from 224 to 1248 px, inference, eager and compiled
#   profile   profiler.py: vim_tiny inference at 1248 px batch 16 and vim_small training at 224 px batch 128, memory
#   ab        ab.py: the tree in AB_BASE (from `python benchmarks/ab.py extract REV DIR`) against this one
#   loader    loader.py: the ImageNet recipe's loader by worker count, up to the cores present
#   ddp       train.py on 1 GPU and on all GPUs, then ddp_scaling.py (two or more GPUs only)
#
# Records (<benchmark>_<card>.json) and one log (suite.log) go to $OUT (default /tmp/gpu_suite). The records of this
# card in benchmarks/results/ are copied there first: rows measured again replace theirs, the others stay where
# the card, software and code are the same (common.write_result). Copy the records back into benchmarks/results/
# and run `python benchmarks/report.py --plot`.
# Without .git (a copied tree) the commit comes from a COMMIT file: `python benchmarks/common.py stamp` beforehand.
# A machine without network may first install wheels of what it lacks (docs/BENCHMARKS_OFFLINE.md): WHEELS=.whl.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_suite}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
LOG="$OUT/suite.log"
steps=${*:-mamba tests scan train224 infer224 res1248 sweep profile ab loader ddp}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

wheels=${WHEELS:-}
if [ -n "$wheels" ]; then  # optional: a failed install is reported, the steps still run
  "$PY" -m pip install -q --no-index --no-deps "$wheels"/*.whl || echo "warning: installing $wheels/*.whl failed" | tee -a "$LOG"
fi
if ! "$PY" -c "import vision_mamba, vim_kernels" 2>/dev/null; then  # not installed: run from this source tree
  mkdir -p /tmp/vim_pkg && ln -sfn "$PWD/kernels" /tmp/vim_pkg/vim_kernels
  export PYTHONPATH="$PWD/src:/tmp/vim_pkg${PYTHONPATH:+:$PYTHONPATH}"
fi
[ -e .git ] || [ -f COMMIT ] || echo "warning: no .git and no COMMIT file: records will not name their commit" | tee -a "$LOG"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"
card=$("$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); import common; print(common.card_tag())")
cp -n benchmarks/results/*_"$card".json "$OUT"/ 2>/dev/null

declare -A status; order=()
run() {  # name, command...: output appended to the log, its tail shown
  local name=$1 t0=$SECONDS; shift
  order+=("$name")
  echo "== $name: $*" >> "$LOG"
  "$@" > "$OUT/.step.log" 2>&1
  status[$name]="rc=$? $((SECONDS - t0))s"
  cat "$OUT/.step.log" >> "$LOG"; tail -n 15 "$OUT/.step.log"; rm -f "$OUT/.step.log"
}
bb=("$PY" benchmarks/backbones.py --out "$OUT")
mamba_pid=""; mamba_args=()
train=(src/train.py data=digits data.img_size=224 data.num_workers=8 model=vim_small logger=csv
  callbacks=default_with_throughput extras.print_config=false test=false paths.data_dir=/tmp/vim_data
  trainer.max_steps=120 trainer.max_epochs=1000 trainer.limit_val_batches=0 optimized_metric=null)
for step in $steps; do
  name=${step%%:*}; models=()
  [ "$name" != "$step" ] && IFS=, read -ra models <<< "${step#*:}"
  pick() { if [ ${#models[@]} -gt 0 ]; then echo "${models[@]}"; else echo "$@"; fi; }  # the step's models
  case $name in
    tests) run tests "$PY" -m pytest -q -m gpu tests -p no:cacheprovider ;;
    mamba) sdist=${MAMBA_SDIST:-$(ls .whl/mamba_ssm-*.tar.gz 2>/dev/null | head -n 1)}
      if [ -n "$sdist" ]; then
        "$PY" tools/mamba_ssm_cuda.py --src "$sdist" --build /tmp/mamba_build >> "$LOG" 2>&1 & mamba_pid=$!
      else status[mamba]="skipped: no MAMBA_SDIST"; fi ;;
    scan) if [ -n "$mamba_pid" ]; then wait "$mamba_pid"; status[mamba]="rc=$?"; mamba_pid=""; fi
      [ -f /tmp/mamba_build/CHECKED ] && mamba_args=(--mamba-build /tmp/mamba_build)
      run scan "$PY" benchmarks/scan.py --out "$OUT" "${mamba_args[@]}" ;;
    train224) run "$step" "${bb[@]}" --models $(pick vim_tiny vim_small) --resolutions 224 --parts train lightning \
                --modes eager compiled compiled-cudagraphs ;;
    infer224) run "$step" "${bb[@]}" --models $(pick vim_tiny vim_small deit_tiny_fused) --resolutions 224 \
                --parts infer latency --modes eager compiled compiled-cudagraphs ;;
    res1248) run "$step" "${bb[@]}" --models $(pick vim_tiny deit_tiny_fused deit_tiny_plain) --resolutions 1248 \
               --parts infer latency --modes eager compiled ;;
    sweep) run "$step" "${bb[@]}" --models $(pick vim_tiny deit_tiny_fused deit_tiny_plain) --resolutions 224 512 736 1024 1248 \
             --parts infer --modes eager compiled --iters 10 ;;
    profile) run profile_infer "$PY" benchmarks/profiler.py --model vim_tiny --img-size 1248 --batch 16 --memory --out "$OUT"
      run profile_train "$PY" benchmarks/profiler.py --model vim_small --img-size 224 --batch 128 --train --memory \
        --out "$OUT" ;;
    ab) if [ -n "${AB_BASE:-}" ]; then run ab "$PY" benchmarks/ab.py run "$AB_BASE" . --rounds "${AB_ROUNDS:-3}" --out "$OUT"
        else status[ab]="skipped: set AB_BASE to a tree from benchmarks/ab.py extract"; fi ;;
    loader) run loader "$PY" benchmarks/loader.py --data /tmp/vim_loader_data --out "$OUT" ;;
    ddp) gpus=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
      if [ "$gpus" -ge 2 ]; then
        run ddp_1gpu "$PY" "${train[@]}" trainer=gpu data.batch_size=128 hydra.run.dir=/tmp/vim_ddp/1
        run ddp_"$gpus"gpu "$PY" "${train[@]}" trainer=ddp trainer.devices="$gpus" data.batch_size=$((128 * gpus)) \
          hydra.run.dir=/tmp/vim_ddp/"$gpus"
        run ddp "$PY" benchmarks/ddp_scaling.py /tmp/vim_ddp/1 /tmp/vim_ddp/"$gpus" --gpus "$gpus" --out "$OUT"
      else status[ddp]="skipped: one GPU"; fi ;;
    *) status[$step]="unknown step (see the head of benchmarks/gpu_suite.sh)" ;;
  esac
done
[ -n "$mamba_pid" ] && wait "$mamba_pid"
declare -A shown
echo; echo "== GPU suite summary ($OUT)" | tee -a "$LOG"
for k in "${order[@]}" "${!status[@]}"; do [ -n "${shown[$k]:-}" ] && continue; shown[$k]=1; printf '%-14s %s\n' "$k" "${status[$k]}" | tee -a "$LOG"; done
