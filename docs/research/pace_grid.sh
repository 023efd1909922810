#!/usr/bin/env bash
# Configuration 3's collapse against the predictor's pace: the y-encoder's averaging (--ema-tau 0.99 or 0) crossed
# with the predictor's learning rate as a multiple of the encoder's (--predictor-lr-mult 0.1, 1, 10); a linear
# predictor at pace 1 (--predictor linear, cells tau<T>-linear) and the same refit by least squares before every step
# (--predictor closed-form, cells tau<T>-closed); configuration 2 at tau 0 and pace 1 as the control; 50k steps,
# screening seeds 6-8, every run single-threaded.
# The warm-up stays off, as in the ingredient ablation (docs/research/ablation.sh), whose tau 0.99 and tau 0 cells at
# pace 1 these repeat.
#
#   PYTHON=.venv/bin/python bash docs/research/pace_grid.sh --jobs 2     # logs in runs/pace/<cell>
#   bash docs/research/pace_grid.sh --dry-run                            # print the commands
#   python docs/research/pace_table.py runs/pace --csv docs/pace_grid.csv --plot docs/pace_grid.png
set -euo pipefail
cd "$(dirname "$0")/../.."

jobs=2
seeds="6 7 8"
logdir=runs/pace
dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --jobs) jobs="$2"; shift 2 ;;
    --seeds) seeds="$2"; shift 2 ;;
    --logdir) logdir="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    *) echo "error: unknown option $1 (allowed: --jobs N, --seeds \"6 7 8\", --logdir DIR, --dry-run)" >&2; exit 2 ;;
  esac
done
case "$jobs" in ''|*[!0-9]*|0) echo "error: --jobs must be a positive integer, got '$jobs'" >&2; exit 2 ;; esac

commands=""
add_cell() {  # configuration, tau, pace (a multiple for the MLP; "linear" or "closed")
  local cell="tau$2-pace$3" predictor="--predictor-lr-mult $3"
  [ "$3" = linear ] && cell="tau$2-linear" && predictor="--predictor linear"
  [ "$3" = closed ] && cell="tau$2-closed" && predictor="--predictor closed-form"
  [ "$dry_run" = 1 ] || mkdir -p "$logdir/$cell"
  commands+=$(bash scripts/reproduce.sh --dry-run --configs "$1" --seeds "$seeds" --logdir "$logdir/$cell" \
    --flags "--total-timesteps 50000 --lr-warmup-iters 0 --ema-tau $2 $predictor")$'\n'
}
for tau in 0.99 0; do
  for pace in 0.1 1 10 linear closed; do
    add_cell 3 "$tau" "$pace"
  done
done
add_cell 2 0 1
if [ "$dry_run" = 1 ]; then
  printf '%s' "$commands"
  exit 0
fi
printf '%s' "$commands" | PYTHON="${PYTHON:-python}" xargs -d '\n' -P "$jobs" -I CMD sh -c CMD
