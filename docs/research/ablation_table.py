"""The configuration-3 ablation table from the logs of docs/research/ablation.sh.

    python docs/research/ablation_table.py runs/ablation runs/ablation_config1 [--steps 50000] [--csv F] [--plot F]

Reads <logdir>/<ingredient>/<run directories> (of every log directory given) and prints, per ingredient and configuration (mean over seeds
unless said otherwise):
  final return     mean return of the episodes that end in the last 10k steps (per seed, then mean +- std)
  pre-LN variance  embedding/variance_pre_ln (the CLS output before the final LayerNorm): lowest over the run
                   (median over seeds) and at the end (mean of the last 10 iterations, median over seeds)
  variance         embedding/variance (the embedding s_x that predictor and heads see): lowest and at the end
  collapsed        iterations with embedding/collapsed = 1 (variance < 1e-7), in all seeds together
  rank             embedding/effective_rank (centred): lowest and at the end
  LN gain          embedding/ln_gain_norm at the end (8 at initialisation with d = 64)
"""

import argparse
import csv
import glob
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts"))
from plot import final_return, read_run, running_mean  # noqa: E402

CONFIGURATIONS = {"nojepa-rlgrad-novar": "1", "jepa-rlgrad-novar": "2", "jepa-norlgrad-novar": "3"}


def summarize(run, steps):
    episode_steps, returns = run["charts/episodic_return"]
    last = lambda tag: float(run[tag][1][-10:].mean()) if tag in run else float("nan")
    lowest = lambda tag: float(run[tag][1].min()) if tag in run else float("nan")
    grid = np.arange(0, steps + 1, 500)
    curve = lambda tag: np.exp(np.interp(grid, run[tag][0], np.log(np.maximum(run[tag][1], 1e-12))))
    return {
        "return_curve": np.interp(grid, *running_mean(episode_steps, returns), left=returns[0]),
        "variance_curve": curve("embedding/variance"), "pre_ln_curve": curve("embedding/variance_pre_ln"), "grid": grid,
        "final_return": final_return(episode_steps, returns, steps),
        "lowest_pre_ln": lowest("embedding/variance_pre_ln"), "final_pre_ln": last("embedding/variance_pre_ln"),
        "lowest_variance": lowest("embedding/variance"), "final_variance": last("embedding/variance"),
        "collapsed": int(run["embedding/collapsed"][1].sum()), "iterations": len(run["embedding/collapsed"][1]),
        "lowest_rank": lowest("embedding/effective_rank"), "final_rank": last("embedding/effective_rank"),
        "ln_gain": last("embedding/ln_gain_norm"),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("logdirs", nargs="+", help="directories with one subdirectory of runs per ingredient (docs/research/ablation.sh)")
    parser.add_argument("--steps", type=int, default=50_000, help="length of the runs")
    parser.add_argument("--csv", help="also write one row per run to this file")
    parser.add_argument("--plot", help="also draw return and variance curves (mean over seeds) to this file")
    opts = parser.parse_args()
    rows, per_run = [], []
    for ingredient_dir in sorted(d for logdir in opts.logdirs for d in glob.glob(os.path.join(logdir, "*/"))):
        ingredient = os.path.basename(os.path.normpath(ingredient_dir))
        for configuration, number in CONFIGURATIONS.items():
            runs = {}
            for run_dir in sorted(glob.glob(os.path.join(ingredient_dir, f"*__{configuration}__s*__*"))):
                run = read_run(run_dir)
                if "charts/SPS" not in run or run["charts/SPS"][0][-1] < opts.steps - 1000:
                    print(f"skipped, not finished: {run_dir}")
                    continue
                seed = int(os.path.basename(run_dir).split("__")[2][1:])
                runs[seed] = summarize(run, opts.steps)
                per_run.append({"ingredient": ingredient, "configuration": number, "seed": seed,
                                **{k: v for k, v in runs[seed].items() if not isinstance(v, np.ndarray)}})
            if runs:
                rows.append((ingredient, number, runs))
    order = ["defaults", "no-ink", "no-final-ln", "no-ink-no-final-ln", "weight-decay", "fresh-targets", "ema-per-iteration", "ema-tau-0"]
    rows.sort(key=lambda r: (order.index(r[0]) if r[0] in order else len(order), r[0], r[1]))
    print("| change | config | seeds | final return (mean +- std; per seed) | pre-LN variance: lowest, end | variance: lowest, end "
          "| collapsed iterations | effective rank: lowest, end | LN gain norm, end |")
    print("|---|---|---|---|---|---|---|---|---|")
    for ingredient, number, runs in rows:
        col = lambda key: np.array([r[key] for r in runs.values()])
        finals = col("final_return")
        ln_gain = f"{np.nanmean(col('ln_gain')):.2f}" if np.isfinite(col("ln_gain")).any() else "- (no LayerNorm)"
        print(f"| {ingredient} | {number} | {' '.join(map(str, runs))} | {finals.mean():.1f} +- {finals.std():.1f}; "
              f"{' '.join(f'{f:.0f}' for f in finals)} | {np.median(col('lowest_pre_ln')):.1e}, {np.median(col('final_pre_ln')):.1e} "
              f"| {np.median(col('lowest_variance')):.1e}, {np.median(col('final_variance')):.1e} "
              f"| {col('collapsed').sum()}/{col('iterations').sum()} | {col('lowest_rank').mean():.1f}, {col('final_rank').mean():.1f} "
              f"| {ln_gain} |")
    if opts.csv and per_run:
        with open(opts.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(per_run[0]))
            writer.writeheader()
            writer.writerows(per_run)
    if opts.plot and rows:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(3, 3, figsize=(17, 11), constrained_layout=True, sharex=True)
        ingredients = list(dict.fromkeys(r[0] for r in rows))
        # no configuration's colour (scripts/plot.py's COLORS): here a colour is an ingredient, the row a configuration
        palette = ["black", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "goldenrod",
                   "navy", "lime"]
        colors = dict(zip(ingredients, palette))
        panels = [("return_curve", "running mean return (20 episodes)"), ("variance_curve", "embedding/variance (s_x)"),
                  ("pre_ln_curve", "embedding/variance_pre_ln (CLS output)")]
        for ingredient, number, runs in rows:
            row = list(CONFIGURATIONS.values()).index(number)
            for col, (key, title) in enumerate(panels):
                curves = np.stack([r[key] for r in runs.values()])
                center = curves.mean(0) if key == "return_curve" else np.exp(np.log(curves).mean(0))
                ax = axes[row, col]
                ax.plot(next(iter(runs.values()))["grid"], center, color=colors[ingredient], label=ingredient)
                ax.set_title(f"configuration {number}: {title}")
                if key != "return_curve":
                    ax.set_yscale("log")
                    ax.axhline(1e-7, color="black", linestyle="--", linewidth=1)
        for ax in axes[-1]:
            ax.set_xlabel("environment steps")
        axes[1, 0].legend(fontsize=8)  # configuration 2 has every ingredient
        fig.suptitle("Configuration 3's collapse, one ingredient changed at a time (configuration 2 as control); "
                     "mean over seeds (geometric for variances); dashed: the paper's 1e-7")
        fig.savefig(opts.plot, dpi=100)
