#!/usr/bin/env bash
# Pretrain every run of experiments/RESULTS.md, one after the other, into ROOT/KIND_sSEED.
# A finished run (this script left DONE in its workdir) is skipped; an unfinished one resumes from
# its newest checkpoint.
#   usage: experiments/results/run_pretrain.sh CIFAR10_JPG_DIR [ROOT]
set -euo pipefail
data_dir=${1:?usage: run_pretrain.sh CIFAR10_JPG_DIR [ROOT]}
root=${2:-workdirs/results}
python=${PYTHON:-python}

runs=(
  "ascl 0 weak" "normal 0 weak" "ascl 1 weak" "normal 1 weak"
  "hard 0 weak" "ahcl 0 weak" "ascl 0 strong" "ascl 2 weak" "normal 2 weak"
)
for run in "${runs[@]}"; do
  read -r kind seed view <<<"$run"
  name="${kind}_s${seed}"
  [[ $view == strong ]] && name="${kind}_strongtarget_s${seed}"
  workdir="$root/$name"
  if [[ -f $workdir/DONE ]]; then
    echo "== $name: finished, skipped"
    continue
  fi
  echo "== $name: $(date -u +%H:%M:%S)"
  start=$(date +%s)
  "$python" -m experiments.pretrain --config=experiments/configs/cifar10_cpu.py \
    --workdir="$workdir" --config.data_dir="$data_dir" \
    --config.kind="$kind" --config.seed="$seed" --config.target_view="$view"
  echo "== $name: $(( $(date +%s) - start )) s" | tee "$workdir/DONE"
done
