"""Two or more sweeps side by side (for example the ViT and `--encoder cnn`), per configuration.

    pip install -r requirements-plots.txt        # matplotlib, for the figure
    python docs/research/compare.py runs/reproduce:ViT runs/reproduce_cnn:CNN --out docs/vit_vs_cnn.png

Each argument is LOGDIR:LABEL, a sweep written by scripts/reproduce.sh. The statistics are those of
scripts/plot.py (final return = mean of the episodes ending in 90k-100k steps; IQM; 95% t interval of the
mean over seeds); the figure draws, per configuration (in its colour), each sweep's mean running return (a line
style per sweep) with the t interval of the mean as a band. Prints the table as Markdown.
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts"))
from plot import COLORS, CONFIGURATIONS, GRID, iqm, load_sweep, t_interval  # noqa: E402


def rows(sweeps):
    lines = ["| configuration | encoder | seeds | final return: mean +- std [95% CI] | final return: IQM "
             "| AUC: mean [95% CI] | runs reaching 400 (median steps) |", "|---|---|---|---|---|---|---|"]
    for configuration, label, _ in CONFIGURATIONS:
        for name, sweep in sweeps:
            runs = sweep.get(configuration)
            if not runs:
                continue
            finals = np.array([run["final_return"] for run in runs.values()])
            auc = np.array([run["auc"] for run in runs.values()])
            to_400 = np.array([run["steps_to_400"] for run in runs.values()])
            reached = np.isfinite(to_400)
            ci = lambda x: "[{:.1f}, {:.1f}]".format(*t_interval(x))
            median_400 = f"{np.median(to_400) / 1000:.1f}k" if np.isfinite(np.median(to_400)) else "-"
            lines.append(f"| {label} | {name} | {' '.join(map(str, runs))} | {finals.mean():.1f} +- {finals.std(ddof=1):.1f} "
                         f"{ci(finals)} | {iqm(finals):.1f} | {auc.mean():.1f} {ci(auc)} "
                         f"| {reached.sum()}/{len(to_400)} ({median_400}) |")
    return "\n".join(lines)


def plot(sweeps, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [c for c in CONFIGURATIONS if any(c[0] in sweep for _, sweep in sweeps)]  # a panel per configuration run
    width = 4.5 if len(shown) > 2 else 7.0  # room for the legend's long labels when there are few panels
    fig, axes = plt.subplots(1, len(shown), figsize=(width * len(shown), 4.2), sharey=True, constrained_layout=True, squeeze=False)
    for ax, (configuration, label, _) in zip(axes[0], shown):
        for (name, sweep), style, alpha in zip(sweeps, ["-", "--", ":", "-."], [0.25, 0.12, 0.08, 0.05]):
            if configuration not in sweep:
                continue
            curves = np.stack([run["return_curve"] for run in sweep[configuration].values()])
            ax.plot(GRID, curves.mean(0), color=COLORS[configuration], linestyle=style, label=f"{name} ({len(curves)} seeds)")
            ax.fill_between(GRID, *t_interval(curves), color=COLORS[configuration], alpha=alpha)
        ax.set_title(label)
        ax.set_xlabel("environment steps")
        ax.legend(loc="upper left", fontsize="small")
    axes[0, 0].set_ylabel("running mean return (last 20 episodes)")
    fig.suptitle("Encoders side by side: mean over seeds (line), 95% t interval of the mean (band)")
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("sweeps", nargs="+", help="LOGDIR:LABEL, one per sweep")
    parser.add_argument("--out", default="docs/vit_vs_cnn.png", help="the figure's path")
    opts = parser.parse_args()
    sweeps = []
    for spec in opts.sweeps:
        logdir, sep, name = spec.rpartition(":")
        if not sep or not logdir or not name:
            sys.exit(f"error: each sweep is LOGDIR:LABEL, got '{spec}'")
        sweeps.append((name, load_sweep(logdir)))
    plot(sweeps, opts.out)
    print(rows(sweeps))
