#!/usr/bin/env bash
# Figure 3: the paper's four configurations x 5 seeds x 100k steps, each run single-threaded.
#
#   bash scripts/reproduce.sh                       # seeds 1-5, 2 runs at a time, logs in runs/reproduce
#   PYTHON=.venv/bin/python bash scripts/reproduce.sh --jobs 2
#   bash scripts/reproduce.sh --jobs 8 --seeds "1 2 3 4 5 6 7 8 9 10" --logdir runs/more
#   bash scripts/reproduce.sh --flags "--tubelets" --logdir runs/reproduce_tubelets   # same flags added to every run
#   bash scripts/reproduce.sh --configs "2 3" --seeds "6 7 8" --flags "--total-timesteps 50000"   # a subset
#   bash scripts/reproduce.sh --script jepa_ppo_cartpole.py   # the reference itself: the same values, no probes
#   python scripts/plot.py runs/reproduce --out docs
#
# The runs go through the lab (jepa_ppo_cartpole_lab.py) by default: with no lab flag it logs the reference's values
# to the bit and adds the probes that the research log's tables report; lab flags (--encoder cnn, ...) need it.
#
# Runs share nothing, so the sweep splits over machines in any way: give each machine its own --seeds,
# or feed the printed commands (--dry-run) to a job array or `xargs -P`.
set -euo pipefail
cd "$(dirname "$0")/.."

jobs=2
seeds="1 2 3 4 5"
configs="1 2 3 4"
logdir=runs/reproduce
dry_run=0
flags=""
script=jepa_ppo_cartpole_lab.py
while [ $# -gt 0 ]; do
  case "$1" in
    --jobs) jobs="$2"; shift 2 ;;
    --seeds) seeds="$2"; shift 2 ;;
    --configs) configs="$2"; shift 2 ;;
    --logdir) logdir="$2"; shift 2 ;;
    --flags) flags="$2"; shift 2 ;;
    --script) script="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    *) echo "error: unknown option $1 (allowed: --jobs N, --seeds \"1 2 ...\", --configs \"1 2 3 4\", --logdir DIR, --flags \"...\", --script FILE, --dry-run)" >&2; exit 2 ;;
  esac
done
case "$jobs" in ''|*[!0-9]*|0) echo "error: --jobs must be a positive integer, got '$jobs'" >&2; exit 2 ;; esac

python="${PYTHON:-python}"
configurations=(
  "--no-jepa --rl-grad --no-var-reg"   # 1: RL gradient only
  "--jepa --rl-grad --no-var-reg"      # 2: JEPA + RL gradient (the default)
  "--jepa --no-rl-grad --no-var-reg"   # 3: JEPA only
  "--jepa --no-rl-grad --var-reg"      # 4: JEPA + variance loss
)

commands=()
for seed in $seeds; do
  for c in $configs; do
    case "$c" in 1|2|3|4) ;; *) echo "error: --configs takes numbers from 1 to 4, got '$c'" >&2; exit 2 ;; esac
    commands+=("OMP_NUM_THREADS=1 $python $script ${configurations[$((c - 1))]} $flags --seed $seed --no-cuda \
--exp-name reproduce --runs-dir $logdir > $logdir/config${c}_seed$seed.log 2>&1")
  done
done

if [ "$dry_run" = 1 ]; then
  printf '%s\n' "${commands[@]}"
  exit 0
fi
mkdir -p "$logdir"
printf '%s\0' "${commands[@]}" | xargs -0 -P "$jobs" -n 1 sh -c
steps=$(printf '%s' "$flags" | sed -n 's/.*--total-timesteps[ =]\([0-9]*\).*/\1/p')
out=$logdir   # only the full default sweep replaces the figure and table in docs/
[ "$logdir $seeds $configs $flags" = "runs/reproduce 1 2 3 4 5 1 2 3 4 " ] && out=docs
echo "done: python scripts/plot.py $logdir --out $out${steps:+ --steps $steps}"
