#!/usr/bin/env bash
# Everything that must run on a GPU, checked and timed in one call of the device tool (see benchmarks/README.md):
#   bash benchmarks/gpu_suite.sh [tests] [scan] [cross] [train] [backbones] [ddp]     (no argument: these)
#   extra steps: kernel_tests / model_tests (one folder of the GPU tests), scan_variants (scan.py --variants),
#   tune (the variants, then the scan table with the chosen settings, which later steps of the call use),
#   scan_ab (the working tree's scan against AB_BASE=<a kernels/ copy of an earlier commit>, GPU time per round),
#   vim1248 (vim_tiny vs deit_tiny at 1248 and Vim-S training: issue 9's figures alone), train_T4 (Vim-S training
#   with T 4), TESTS_K="..." (a subset of the GPU tests, by name),
#   profile (kernel table of vim_tiny inference at 1248, and the tensors alive at its memory peak), crossover
#   (vim_tiny vs fused-attention deit_tiny from 2048 to 3072 px), long_scan (the long-L forward's variants), mamba (builds mamba_ssm's selective_scan_cuda from the
#   sdist carried in .whl/, in the background: the scan and mamba_side steps wait for it and time it beside ours).
#   The third session's figures: bash benchmarks/gpu_suite.sh mamba model_tests profile backbones mamba_side scan
# Needs the offline wheels (`../shared/offline-wheels.sh .whl`, carried as .whl). Results land in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_suite}
mkdir -p "$OUT"
steps=${*:-tests scan cross train backbones ddp}
tests_k=(); [ -n "${TESTS_K:-}" ] && tests_k=(-k "$TESTS_K")  # TESTS_K="split or prefetch": a subset of the GPU tests
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
# the package from src/, and kernels/ under its import name (no build step needed)
mkdir -p /tmp/pkg && ln -sfn "$PWD/kernels" /tmp/pkg/vim_kernels
export PYTHONPATH=/tmp/site:$PWD/src:/tmp/pkg PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'gpus', torch.cuda.device_count())"
declare -A status
run() {  # name, command...
  local name=$1; shift
  local t0=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  status[$name]="rc=$? $((SECONDS - t0))s"
  tail -n 25 "$OUT/$name.log"
}
common_train=(data=digits data.img_size=224 data.num_workers=8 model=vim_small model.scan_backend=triton
  task.base_lr=1e-3 task.schedule.warmup_epochs=1 logger=csv callbacks=default_with_throughput extras.print_config=false test=false)
mamba_pid=""; mamba_args=()
mamba_ready() {  # wait for a background mamba_ssm build; its folder goes to the benchmarks when it succeeded
  if [ -n "$mamba_pid" ]; then
    wait "$mamba_pid"; status[mamba]="rc=$? (built in the background)"; mamba_pid=""
    tail -n 3 "$OUT/mamba.log"
    ls /tmp/mamba_build/selective_scan_cuda*.so >/dev/null 2>&1 && mamba_args=(--mamba-build /tmp/mamba_build)
  fi
}
for step in $steps; do
  case $step in
    mamba) mkdir -p /tmp/mamba_src && tar xzf .whl/mamba_ssm-*.tar.gz -C /tmp/mamba_src || exit 1
           MAX_JOBS=12 python3 benchmarks/mamba_ssm_cuda.py --src /tmp/mamba_src/mamba_ssm-* --build /tmp/mamba_build \
             > "$OUT/mamba.log" 2>&1 & mamba_pid=$! ;;
    profile) run profile python3 benchmarks/profile_backbone.py --memory --out "$OUT" ;;
    crossover) run crossover python3 benchmarks/backbones.py --models vim_tiny deit_tiny_fused \
                 --resolutions 2048 2304 2560 3072 --train-models --iters 5 --result-name backbones_crossover --out "$OUT" ;;
    long_scan) run long_scan python3 benchmarks/long_scan.py --out "$OUT" ;;
    tests) run tests python3 -m pytest -q -m gpu tests/kernels tests/models -p no:cacheprovider "${tests_k[@]}" ;;
    kernel_tests) run kernel_tests python3 -m pytest -q -m gpu tests/kernels -p no:cacheprovider "${tests_k[@]}" ;;
    tune) # the variants, then the scan table with the fastest checked ones (beside mamba_ssm's kernel when the
          # `mamba` step runs in the background); later steps of this call use the chosen settings
      wait_args=(); [ -n "$mamba_pid" ] && wait_args=(--mamba-build /tmp/mamba_build --mamba-wait 600)
      run tune python3 benchmarks/scan.py --variants all --no-torch "${wait_args[@]}" --out "$OUT"
      [ -f "$OUT/scan_config.json" ] && export VIM_SCAN_CONFIG="$(cat "$OUT/scan_config.json")" && echo "chosen: $VIM_SCAN_CONFIG" ;;
    scan) mamba_ready; run scan python3 benchmarks/scan.py "${mamba_args[@]}" --out "$OUT" ;;
    scan_variants) run scan_variants python3 benchmarks/scan.py --variants --no-torch --out "$OUT" ;;
    scan_ab) # the working tree's kernels against AB_BASE, a copy of kernels/ from an earlier commit (scan_ab.py)
      run scan_ab python3 benchmarks/scan_ab.py --kernels "base=${AB_BASE:?set AB_BASE to a kernels/ copy}" \
        --kernels "new=$PWD/kernels" --rounds 3 --out "$OUT" ;;
    cross) run cross python3 benchmarks/cross_scan.py --out "$OUT" ;;
    train) run train python3 src/train.py "${common_train[@]}" trainer=gpu data.batch_size=128 trainer.max_steps=300 \
             trainer.max_epochs=1000 hydra.run.dir="$OUT/train_run" paths.data_dir=/tmp/data
           run train_check python3 benchmarks/gpu_model_check.py "$OUT/train_run" --out "$OUT" ;;
    train_T4) # Vim-S training at 224 with chunks of 4 steps (one-step backward capped at 168 registers) instead of
              # "auto" (8 for Vim-S: half the saved states): the speed/memory trade-off
      VIM_SCAN_CONFIG='{"fwd": {"T": 4}}' run train_T4 python3 benchmarks/backbones.py --models --train-models vim_small \
        --iters 10 --result-name backbones_train_T4 --out "$OUT" ;;
    model_tests) run model_tests python3 -m pytest -q -m gpu tests/models -p no:cacheprovider ;;
    backbones) run backbones python3 benchmarks/backbones.py --iters 10 --out "$OUT" ;;
    vim1248) # the issue-9 comparison alone: vim_tiny vs deit_tiny at 1248, Vim-S training at 224
      run vim1248 python3 benchmarks/backbones.py --models vim_tiny deit_tiny_fused deit_tiny_plain --resolutions 1248 \
        --train-models vim_small --iters 10 --result-name backbones_1248 --out "$OUT" ;;
    mamba_side) mamba_ready  # Vim with mamba_ssm's scan in place of ours: vim_tiny at 1248, vim_small training
      run mamba_side python3 benchmarks/backbones.py --models vim_tiny --resolutions 1248 --train-models vim_small \
        --iters 10 "${mamba_args[@]}" --result-name backbones_mamba_ssm --out "$OUT" ;;
    ddp) if [ "$(python3 -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
           run ddp1 python3 src/train.py "${common_train[@]}" trainer=gpu data.batch_size=128 trainer.max_steps=120 \
               trainer.max_epochs=1000 trainer.limit_val_batches=0 optimized_metric=null hydra.run.dir="$OUT/ddp1" paths.data_dir=/tmp/data
           run ddp2 python3 src/train.py "${common_train[@]}" trainer=ddp trainer.devices=2 data.batch_size=256 \
               trainer.max_steps=120 trainer.max_epochs=1000 trainer.limit_val_batches=0 optimized_metric=null hydra.run.dir="$OUT/ddp2" paths.data_dir=/tmp/data
           run ddp_summary python3 benchmarks/ddp_scaling.py "$OUT/ddp1" "$OUT/ddp2" --out "$OUT"
         else status[ddp]="skipped: one GPU"; fi ;;
  esac
done
mamba_ready
echo; echo "== GPU suite summary =="
for k in "${!status[@]}"; do printf '%-14s %s\n' "$k" "${status[$k]}"; done
