#!/usr/bin/env bash
# Linear probe of every finished run under ROOT, then the figures and the tables of RESULTS.md.
#   usage: experiments/results/run_evaluation.sh [ROOT] [OUT]
# ROOT contains the workdirs that run_pretrain.sh wrote; OUT receives the PNGs and tables.md.
set -euo pipefail
root=${1:-workdirs/results}
out=${2:-experiments/results}
python=${PYTHON:-python}

workdirs=()
for workdir in "$root"/*/; do
  workdir=${workdir%/}
  [[ -f $workdir/DONE ]] || continue
  workdirs+=("--workdir=$workdir")
  # Features mode with L2-normalised features and learning rate 1: the choice made on 5,000
  # held-out training images (RESULTS.md lists the grid).
  "$python" -m experiments.linear_eval --workdir="$workdir" --mode=features \
    --normalize_features --learning_rate=1
done
"$python" -m experiments.plot "${workdirs[@]}" --output_dir="$out/figures"
"$python" -m experiments.results.summarize "${workdirs[@]}" --baseline=normal \
  --linear_setting=mode=features --linear_setting=normalize_features=true \
  --linear_setting=learning_rate=1 > "$out/tables.md"
