#!/usr/bin/env bash
# The privacy measurements of docs/privacy.md and the closing note (CPU-scaled): overfit runs and the default job
# audited; DP-SGD at eps=10 and eps=1 next to the non-private twin at the same budget; PGA with DP discriminators.
# Usage: bench/privacy_runs.sh OUT_DIR [PART ...]   PART: overfit default q10 pga overfit40 (default: all);
#        Q10="dp1" runs only those q10 variants (none dp10 dp1), so that two shells can share the work
# then:  .venv/bin/python bench/privacy.py OUT_DIR --json docs/bench/privacy_cpu.json
# Rerunnable: a finished training resumes to "nothing to train"; an evaluation or audit already logged is skipped.
set -euo pipefail
OUT=${1:?usage: bench/privacy_runs.sh OUT_DIR [PART ...]}
shift
PARTS=${*:-overfit default q10 pga overfit40}
FEDGEN=${FEDGEN:-fedgen}
T="--set train.cpu_threads=${THREADS:-1}"
EVAL="--n 1000 --tstr --tstr-samples 2000"
mkdir -p "$OUT"
run() { echo "+ $*" >&2; "$@"; }
once() { local event=$1 dir=$2; shift 2; grep -q "\"event\": \"$event\"" "$dir/metrics.jsonl" 2>/dev/null || run "$@"; }
want() { [[ " $PARTS " == *" $1 "* ]]; }
if want overfit; then  # deliberately overfit: 200 training images, 2 silos, 300 local epochs each in total
  run $FEDGEN train --preset fmnist-quick $T --set data.max_train_samples=200 --set fl.clients=2 \
    --set fl.clients_per_round=2 --set fl.rounds=30 --set fl.local_epochs=10 --out "$OUT/overfit"
  once audit "$OUT/overfit" $FEDGEN audit "$OUT/overfit" --n 200 --generated 1000
fi
if want default; then  # the default job, non-private
  run $FEDGEN train $T --out "$OUT/default"
  once audit "$OUT/default" $FEDGEN audit "$OUT/default"
fi
if want q10; then  # a third of the default job's rounds: non-private, DP-SGD eps=10, eps=1 (delta=1e-5)
  for name in ${Q10:-none dp10 dp1}; do
    case $name in
      none) P="";; dp10) P="--set privacy.mode=dp-sgd --set privacy.target_epsilon=10";;
      dp1) P="--set privacy.mode=dp-sgd --set privacy.target_epsilon=1";;
    esac
    run $FEDGEN train $T --set fl.rounds=10 $P --out "$OUT/q10-$name"
    once evaluate "$OUT/q10-$name" $FEDGEN evaluate "$OUT/q10-$name" $EVAL
    once audit "$OUT/q10-$name" $FEDGEN audit "$OUT/q10-$name" --n 500 --generated 1000
  done
fi
if want pga; then  # PGA, 5 parties, 300 generator steps: non-private and DP discriminators at eps=10
  for name in none dp10; do
    P=""; [ $name = dp10 ] && P="--set privacy.mode=dp-sgd --set privacy.target_epsilon=10"
    run $FEDGEN train --preset pga-fmnist-5-quick $T --set fl.rounds=3 $P --out "$OUT/pga5-$name"
    once evaluate "$OUT/pga5-$name" $FEDGEN evaluate "$OUT/pga5-$name" $EVAL
    once audit "$OUT/pga5-$name" $FEDGEN audit "$OUT/pga5-$name" --n 500 --generated 1000
  done
fi
if want overfit40; then  # more overfit still: 40 training images, 3000 local epochs each
  run $FEDGEN train --preset fmnist-quick $T --set data.max_train_samples=40 --set fl.clients=2 \
    --set fl.clients_per_round=2 --set fl.rounds=30 --set fl.local_epochs=100 --out "$OUT/overfit40"
  once audit "$OUT/overfit40" $FEDGEN audit "$OUT/overfit40" --n 40 --generated 1000
fi
