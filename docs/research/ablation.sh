#!/usr/bin/env bash
# Configuration 3's collapse, one ingredient at a time: configurations 2 (control) and 3, 50k steps, screening
# seeds 6-8, every run single-threaded; the table comes from `python scripts/plot.py <dir> --steps 50000`.
#
#   PYTHON=.venv/bin/python bash docs/research/ablation.sh --jobs 2            # logs in runs/ablation/<ingredient>
#   bash docs/research/ablation.sh --only "defaults no-ink" --dry-run          # print some of the commands
#   bash docs/research/ablation.sh --only "defaults no-ink" --configs 1 --logdir runs/ablation_config1   # configuration 1 too
set -euo pipefail
cd "$(dirname "$0")/../.."

jobs=2
seeds="6 7 8"
logdir=runs/ablation
only=""
configs="2 3"
dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --jobs) jobs="$2"; shift 2 ;;
    --seeds) seeds="$2"; shift 2 ;;
    --logdir) logdir="$2"; shift 2 ;;
    --only) only="$2"; shift 2 ;;
    --configs) configs="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    *) echo "error: unknown option $1 (allowed: --jobs N, --seeds \"6 7 8\", --logdir DIR, --only \"NAME ...\", --configs \"2 3\", --dry-run)" >&2; exit 2 ;;
  esac
done

# name -> the flags that differ from the defaults
declare -A ingredients=(
  [defaults]=""
  [no-ink]="--no-ink"
  [no-final-ln]="--no-final-ln"
  [weight-decay]="--weight-decay 0.4"
  [fresh-targets]="--fresh-targets"
  [ema-per-iteration]="--ema-per-iteration"
  [no-ink-no-final-ln]="--no-ink --no-final-ln"   # raw intensity, judged on the embedding before any normalisation
  [ema-tau-0]="--ema-tau 0"                        # the target a copy of the x-encoder at every step
)
names="${only:-defaults fresh-targets no-ink no-final-ln weight-decay ema-per-iteration no-ink-no-final-ln ema-tau-0}"
# the ablation's table was run before the warm-up became the default: it stays off here so that the script reproduces it
commands=""
for name in $names; do
  [ -n "${ingredients[$name]+set}" ] || { echo "error: --only takes names from: ${!ingredients[*]}, got '$name'" >&2; exit 2; }
  [ "$dry_run" = 1 ] || mkdir -p "$logdir/$name"
  commands+=$(bash scripts/reproduce.sh --dry-run --configs "$configs" --seeds "$seeds" --logdir "$logdir/$name" \
    --flags "--total-timesteps 50000 --lr-warmup-iters 0 ${ingredients[$name]}")$'\n'
done
if [ "$dry_run" = 1 ]; then
  printf '%s' "$commands"
  exit 0
fi
printf '%s' "$commands" | PYTHON="${PYTHON:-python}" xargs -d '\n' -P "$jobs" -I CMD sh -c CMD
