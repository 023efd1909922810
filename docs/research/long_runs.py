"""Beyond the paper's 100k steps: when does each configuration solve CartPole, and does configuration 3 ever learn?

    pip install -r requirements-plots.txt        # matplotlib, for the figure
    bash scripts/reproduce.sh --flags "--total-timesteps 300000 --capture-video" --seeds "1 2 3" --logdir runs/long300
    python docs/research/long_runs.py runs/long300 --out docs/long_runs.png

Reads a sweep of any length (one run per configuration and seed, the runs of a configuration all of one length;
each run's --total-timesteps from the flags it logged; the learning rate anneals over the whole run, not over
100k, and the run ends at T, --total-timesteps rounded down to whole batches). Per run:
  return at k x 100k    mean return of the episodes that end in (k x 100k - 10k, k x 100k], for every k x 100k
                        up to --total-timesteps: scripts/plot.py's final return of a run of k x 100k steps
  AUC                   the running mean of the last 20 episodes averaged over steps 0-T (as docs/research/screen.py)
  steps to 400 / 475    first step at which the running mean of the last 20 episodes reaches 400 / 475
                        (a full window of 20 episodes); 475 is Gymnasium's reward threshold for CartPole-v1
  lowest variance       the minimum of embedding/variance over the run; collapsed: the share of iterations
                        whose embedding/collapsed flag fired (variance below 1e-7)
  greedy return         with --capture-video: the mean return of the greedy episodes played at the end
                        (charts/greedy_return); the other columns are the sampling policy's, which PPO trains
Per configuration: the returns' mean +- standard error over seeds; for each threshold the steps per seed, how
many seeds reached it and the median over all seeds (a seed that never reached it counting as never); the
median lowest variance and the mean share of collapsed iterations over seeds. Runs that have not reached T
(still running, or stopped) are listed apart and left out. The table prints before the figure is drawn. The figure draws each seed's running mean (thin) and their mean (thick), one panel per configuration.
"""

import argparse
import glob
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts"))
from plot import COLORS, CONFIGURATIONS, final_return, read_events, running_mean, steps_to  # noqa: E402
from screen import mean_se, run_steps  # noqa: E402
from screen import summarize as screen_summary  # noqa: E402

THRESHOLDS = (400, 475)


def summarize(run, requested, total):
    """One finished run's figures; `requested` is its --total-timesteps, `total` the step it ended at (whole batches)."""
    steps, returns = run["charts/episodic_return"]
    rm_steps, rm = running_mean(steps, returns)
    return {
        "returns": {end: final_return(steps, returns, end) for end in range(100_000, requested + 1, 100_000)},
        "auc": screen_summary(run, total)["auc"],
        **{f"to_{t}": steps_to(rm_steps, rm, t) for t in THRESHOLDS},
        "lowest_variance": float(run["embedding/variance"][1].min()),
        "collapsed": float(run["embedding/collapsed"][1].mean()),
        "greedy": float(run["charts/greedy_return"][1][-1]) if "charts/greedy_return" in run else float("nan"),
        "curve": (rm_steps, rm),
    }


def load(logdir):
    """{configuration: {seed: summary}} of the finished runs, and a line for each run that has not finished."""
    sweep, unfinished, lengths = {}, [], {}
    for run_dir in sorted(glob.glob(os.path.join(logdir, "*__*__s*__*"))):
        configuration, seed = os.path.basename(run_dir).split("__")[1:3]
        run, flags = read_events(run_dir)
        total, requested = run_steps(flags), int(flags["total_timesteps"])
        reached = run["charts/SPS"][0][-1] if "charts/SPS" in run else 0
        if reached < total:
            unfinished.append(f"{configuration} {seed} unfinished (running or stopped) at {reached / 1000:.1f}k of {total / 1000:.1f}k: left out")
            continue
        if lengths.setdefault(configuration, requested) != requested:
            sys.exit(f"error: runs of {configuration} of {lengths[configuration]} and {requested} steps in {logdir}: "
                     "a configuration's runs must share their length (their learning-rate schedules differ)")
        if int(seed[1:]) in sweep.get(configuration, {}):
            sys.exit(f"error: two finished runs of {configuration} with {seed} in {logdir}: move one away")
        sweep.setdefault(configuration, {})[int(seed[1:])] = summarize(run, requested, total)
    return sweep, unfinished


def thousands(steps):
    return "-" if np.isinf(steps) else f"{steps / 1000:.0f}k"


def table(sweep):
    checkpoints = sorted({end for runs in sweep.values() for run in runs.values() for end in run["returns"]})
    lines = ["| configuration | seeds | " + " | ".join(f"return at {end // 1000}k: mean +- s.e." for end in checkpoints)
             + " | AUC per seed: mean +- s.e. | " + " | ".join(f"steps to {t} per seed (reached; median)" for t in THRESHOLDS)
             + " | lowest variance (median) | collapsed iterations (mean) | greedy return per seed |",
             "|---" * (6 + len(checkpoints) + len(THRESHOLDS)) + "|"]
    for configuration, label, _ in CONFIGURATIONS:
        runs = sweep.get(configuration)
        if not runs:
            continue
        seeds = sorted(runs)
        returns = [mean_se([runs[s]["returns"].get(end, np.nan) for s in seeds]) for end in checkpoints]
        reach = []
        for t in THRESHOLDS:
            to_t = np.array([runs[s][f"to_{t}"] for s in seeds])
            reach.append(f"{' '.join(thousands(x) for x in to_t)} ({np.isfinite(to_t).sum()}/{len(seeds)}; {thousands(np.median(to_t))})")
        lowest = np.median([runs[s]["lowest_variance"] for s in seeds])
        collapsed = np.mean([runs[s]["collapsed"] for s in seeds])
        greedy = " ".join("-" if np.isnan(runs[s]["greedy"]) else f"{runs[s]['greedy']:.1f}" for s in seeds)
        auc = [runs[s]["auc"] for s in seeds]
        auc = f"{' '.join(f'{x:.1f}' for x in auc)}: {mean_se(auc)}"
        lines.append(f"| {label} | {' '.join(map(str, seeds))} | " + " | ".join(returns) + f" | {auc} | " + " | ".join(reach)
                     + f" | {lowest:.2g} | {100 * collapsed:.0f}% | {greedy} |")
    return "\n".join(lines)


def plot(sweep, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2), sharex=True, sharey=True, constrained_layout=True)
    for ax, (configuration, label, _) in zip(axes, CONFIGURATIONS):
        color = COLORS[configuration]
        runs = sweep.get(configuration, {})
        if runs:
            horizon = max(run["curve"][0][-1] for run in runs.values())
            grid = np.linspace(0, horizon, 301)
            curves = np.stack([np.interp(grid, *run["curve"], left=run["curve"][1][0]) for run in runs.values()])
            for curve in curves:
                ax.plot(grid, curve, color=color, alpha=0.35, linewidth=0.8)
            ax.plot(grid, curves.mean(0), color=color, linewidth=2, label=f"mean of {len(curves)} seeds")
            ax.legend(loc="upper left")
        for t in THRESHOLDS:
            ax.axhline(t, color="black", linestyle=":", linewidth=0.8)
        ax.axvline(100_000, color="black", linestyle="--", linewidth=0.8)  # the paper's budget
        ax.set_title(label)
        ax.set_xlabel("environment steps (dashed: the paper's 100k)")
    axes[0].set_ylabel("running mean return (last 20 episodes)")
    fig.suptitle("The four configurations given more steps: each seed (thin), the mean over seeds (thick); dotted: 400 and 475")
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logdir", help="directory holding the sweep's run directories")
    parser.add_argument("--out", default="docs/long_runs.png", help="the figure's path")
    opts = parser.parse_args()
    sweep, unfinished = load(opts.logdir)
    for line in unfinished:
        print(line)
    if sweep:
        print(table(sweep))
        plot(sweep, opts.out)
