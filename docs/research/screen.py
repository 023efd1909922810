"""The screening table: one row per candidate setting, each a directory of runs over a few seeds.

    python docs/research/screen.py runs/screen/vit runs/screen/cnn ...      # one directory per candidate

Every run directory under a candidate's directory counts: one configuration, one run per seed. Runs of any
length compare: with T the run's own steps (its --total-timesteps rounded down to whole batches, read from
the hyperparameters it logged),
  last tenth      mean return of the episodes that end in the last tenth of the run (0.9 T, T]; not the final
                  return of scripts/plot.py, (T' - 10k, T'] with T' the --total-timesteps asked for
  halfway return  the same for the tenth before the middle (0.4 T, 0.5 T]: at 50k steps in a 100k-step run
  AUC             the running mean of the last 20 episodes, averaged over steps 0-T
  steps to 400    first step at which that running mean reaches 400 (a full window of 20 episodes)
Prints per candidate the per-seed values and, as the screening protocol asks, mean +- standard error over seeds.
Runs that stopped (or still run) before T are listed apart, with the step they reached, and left out of the
statistics.
"""

import argparse
import glob
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts"))
from plot import read_events, running_mean, steps_to  # noqa: E402


def run_steps(flags):
    """The steps a run was started for: --total-timesteps rounded down to whole batches (flags: `read_events`)."""
    batch = int(flags["num_envs"]) * int(flags["num_steps"])
    return int(flags["total_timesteps"]) // batch * batch


def summarize(run, total):
    steps, returns = run["charts/episodic_return"]
    rm_steps, rm = running_mean(steps, returns)
    grid = np.linspace(0, total, 101)
    halfway = (steps > 0.4 * total) & (steps <= 0.5 * total)
    return {
        "total": int(total),
        "final": float(returns[steps > 0.9 * total].mean()) if (steps > 0.9 * total).any() else float("nan"),
        "halfway": float(returns[halfway].mean()) if halfway.any() else float("nan"),
        "auc": float(np.interp(grid, rm_steps, rm, left=rm[0]).mean()),
        "to_400": steps_to(rm_steps, rm, 400),
    }


def mean_se(x):
    x = np.asarray(x, dtype=float)
    se = x.std(ddof=1) / np.sqrt(len(x)) if len(x) > 1 else float("nan")
    return f"{x.mean():.1f} +- {se:.1f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("candidates", nargs="+", help="one directory of runs per candidate setting")
    args = parser.parse_args()
    print("| candidate | steps | seeds | last-tenth return per seed | last-tenth return: mean +- s.e. | halfway return: mean +- s.e. "
          "| AUC: mean +- s.e. | steps to 400 per seed |")
    print("|---|---|---|---|---|---|---|---|")
    for candidate in args.candidates:
        runs, stopped, configurations = {}, [], set()
        for run_dir in sorted(glob.glob(os.path.join(candidate, "*__*__s*__*"))):
            configuration, seed = os.path.basename(run_dir).split("__")[1:3]
            configurations.add(configuration)
            if len(configurations) > 1:
                sys.exit(f"error: {candidate} holds runs of more than one configuration ({', '.join(sorted(configurations))}): "
                         "a candidate is one configuration")
            (run, flags), seed = read_events(run_dir), int(seed[1:])
            total = run_steps(flags)
            if seed in runs:
                sys.exit(f"error: two finished runs with seed {seed} in {candidate}: move one away")
            reached = run["charts/SPS"][0][-1] if "charts/SPS" in run else 0
            if reached < total:
                stopped.append(f"seed {seed} stopped at {reached / 1000:.1f}k of {total / 1000:.1f}k")
            else:
                runs[seed] = summarize(run, total)
        for line in stopped:
            print(f"| {os.path.basename(candidate.rstrip('/'))} | {line}: left out |")
        if not runs:
            continue
        seeds = sorted(runs)
        totals = {runs[s]["total"] for s in seeds}
        finals = " ".join(f"{runs[s]['final']:.1f}" for s in seeds)
        to_400 = " ".join("-" if np.isinf(runs[s]["to_400"]) else f"{runs[s]['to_400'] / 1000:.1f}k" for s in seeds)
        print(f"| {os.path.basename(candidate.rstrip('/'))} | {'/'.join(f'{t // 1000}k' for t in sorted(totals))} "
              f"| {' '.join(map(str, seeds))} | {finals} "
              f"| {mean_se([runs[s]['final'] for s in seeds])} "
              f"| {mean_se([runs[s]['halfway'] for s in seeds])} | {mean_se([runs[s]['auc'] for s in seeds])} | {to_400} |")


if __name__ == "__main__":
    main()
