"""The table and figure of the predictor-pace grid, from the logs of docs/research/pace_grid.sh.

    python docs/research/pace_table.py runs/pace [--csv docs/pace_grid.csv] [--plot docs/pace_grid.png]

Reads <logdir>/tau<T>-pace<P>/<run directories> (the MLP predictor at a multiple P of the encoder's learning rate),
tau<T>-linear/ (--predictor linear) and tau<T>-closed/ (--predictor closed-form), and prints one row per cell
(configuration, --ema-tau, predictor), with the measures of docs/research/ablation_table.py: the final return (episodes
ending in the last 10k steps), AUC (the running mean return averaged over the run), the lowest and the last
embedding/variance_pre_ln and embedding/variance (median over seeds), the share of iterations with
embedding/collapsed = 1 (all seeds together), the effective rank (lowest and at the end, mean over seeds) and the
JEPA loss over the last 10 iterations (median over seeds). A cell counts a seed as collapsed when its last 10
iterations are all collapsed.
"""

import argparse
import csv
import glob
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts"))
from ablation_table import summarize  # noqa: E402
from plot import COLORS, read_run  # noqa: E402

CONFIGURATIONS = {"jepa-rlgrad-novar": "2", "jepa-norlgrad-novar": "3"}
PREDICTORS = ["mlp", "linear", "closed"]  # table order within a tau
TINTS = {("mlp", 0.1): 0.35, ("mlp", 1.0): 0.7, ("mlp", 10.0): 1.0, ("linear", 1.0): 1.3, ("closed", 1.0): 1.8}


def predictor_label(cell) -> str:
    return {"mlp": f"MLP, pace {cell['pace']:g}", "linear": "linear, pace 1",
            "closed": "linear, refit every step"}[cell["predictor"]]


def load_cells(logdir, steps):
    cells = []
    for cell_dir in sorted(glob.glob(os.path.join(logdir, "tau*-*/"))):
        match = re.fullmatch(r"tau([0-9.]+)-(pace([0-9.]+)|linear|closed)", os.path.basename(cell_dir[:-1]))
        if match is None:
            print(f"skipped, not a cell of the grid: {cell_dir}")
            continue
        tau, predictor, pace = float(match[1]), "mlp" if match[3] else match[2], float(match[3] or 1)
        for configuration, number in CONFIGURATIONS.items():
            runs = {}
            for run_dir in sorted(glob.glob(os.path.join(cell_dir, f"*__{configuration}__s*__*"))):
                run = read_run(run_dir)
                if "charts/SPS" not in run or run["charts/SPS"][0][-1] < steps - 1000:
                    print(f"skipped, not finished: {run_dir}")
                    continue
                seed = int(os.path.basename(run_dir).split("__")[2][1:])
                runs[seed] = summarize(run, steps)
                runs[seed]["auc"] = float(runs[seed]["return_curve"].mean())
                runs[seed]["collapsed_at_end"] = bool(run["embedding/collapsed"][1][-10:].all())
                runs[seed]["jepa_loss_end"] = float(run["losses/jepa_loss"][1][-10:].mean())
            if runs:
                cells.append({"configuration": number, "tau": tau, "predictor": predictor, "pace": pace, "runs": runs})
    cells.sort(key=lambda c: (c["configuration"] != "3", -c["tau"], PREDICTORS.index(c["predictor"]), c["pace"]))
    return cells


def print_table(cells):
    print("| config | --ema-tau | predictor | seeds | final return (mean; per seed) | AUC (mean; per seed) "
          "| pre-LN variance: lowest, end (median) | s_x variance: lowest, end (median) | collapsed iterations "
          "| seeds collapsed at the end | effective rank: lowest, end | JEPA loss, end |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for cell in cells:
        runs = cell["runs"].values()
        col = lambda key: np.array([r[key] for r in runs])
        per_seed = lambda key: " ".join(f"{v:.0f}" for v in col(key))
        print(f"| {cell['configuration']} | {cell['tau']:g} | {predictor_label(cell)} "
              f"| {' '.join(map(str, cell['runs']))} "
              f"| {col('final_return').mean():.1f}; {per_seed('final_return')} | {col('auc').mean():.1f}; "
              f"{per_seed('auc')} | {np.median(col('lowest_pre_ln')):.1e}, {np.median(col('final_pre_ln')):.1e} "
              f"| {np.median(col('lowest_variance')):.1e}, {np.median(col('final_variance')):.1e} "
              f"| {col('collapsed').sum()}/{col('iterations').sum()} | {col('collapsed_at_end').sum()}/{len(runs)} "
              f"| {col('lowest_rank').mean():.1f}, {col('final_rank').mean():.1f} "
              f"| {np.median(col('jepa_loss_end')):.1e} |")


def write_csv(cells, path):
    keys = ["final_return", "auc", "lowest_pre_ln", "final_pre_ln", "lowest_variance", "final_variance", "collapsed",
            "iterations", "collapsed_at_end", "lowest_rank", "final_rank", "jepa_loss_end"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["configuration", "ema_tau", "predictor", "predictor_lr_mult", "seed", *keys])
        for cell in cells:
            for seed, run in cell["runs"].items():
                writer.writerow([cell["configuration"], cell["tau"], cell["predictor"], cell["pace"], seed,
                                 *(run[k] for k in keys)])


LINESTYLES = {"mlp": "-", "linear": "--", "closed": "-."}


def plot(cells, path):
    """One row of panels per --ema-tau: return, pre-LN variance and s_x variance, each cell's mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgb

    taus = sorted({cell["tau"] for cell in cells}, reverse=True)
    fig, axes = plt.subplots(len(taus), 3, figsize=(15, 4 * len(taus)), constrained_layout=True, sharex=True,
                             squeeze=False)
    panels = [("return_curve", "running mean return (20 episodes)"), ("pre_ln_curve", "embedding/variance_pre_ln"),
              ("variance_curve", "embedding/variance (s_x)")]
    for cell in cells:
        runs = list(cell["runs"].values())
        configuration = next(k for k, v in CONFIGURATIONS.items() if v == cell["configuration"])
        tint = TINTS.get((cell["predictor"], cell["pace"]), 1.0)  # under 1: towards white; over 1: towards black
        base = np.array(to_rgb(COLORS[configuration]))
        color = 1 - tint * (1 - base) if tint <= 1 else base / tint
        label = f"config {cell['configuration']}, {predictor_label(cell)} ({len(runs)} seeds)"
        for ax, (key, title) in zip(axes[taus.index(cell["tau"])], panels):
            curves = np.stack([r[key] for r in runs])
            center = curves.mean(0) if key == "return_curve" else np.exp(np.log(curves).mean(0))
            ax.plot(runs[0]["grid"] / 1000, center, color=color, linestyle=LINESTYLES[cell["predictor"]],
                    linewidth=2 if cell["configuration"] == "3" else 1.2, label=label)
            ax.set_title(f"--ema-tau {cell['tau']:g}: {title}", fontsize=10)
            if key != "return_curve":
                ax.set_yscale("log")
                ax.axhline(1e-7, color="black", linestyle=":", linewidth=1)
    for ax in axes[-1]:
        ax.set_xlabel("environment steps (thousands)")
    for row in axes:
        row[0].legend(fontsize=8)
    fig.suptitle("Configuration 3: the predictor's pace (MLP: its learning rate / the encoder's; linear: trained, or "
                 "refit before every step) against the target's averaging; mean over seeds (geometric for variances); "
                 "dotted: 1e-7", fontsize=9)
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("logdir", help="the --logdir of docs/research/pace_grid.sh (one subdirectory per cell)")
    parser.add_argument("--steps", type=int, default=50_000, help="length of the runs")
    parser.add_argument("--csv", help="also write one row per run to this file")
    parser.add_argument("--plot", help="also draw return and variance curves (mean over seeds) to this file")
    opts = parser.parse_args()
    cells = load_cells(opts.logdir, opts.steps)
    if not cells:
        sys.exit(f"error: no finished runs under {opts.logdir}/tau*-pace*/, tau*-linear/ or tau*-closed/")
    print_table(cells)
    if opts.csv:
        write_csv(cells, opts.csv)
    if opts.plot:
        plot(cells, opts.plot)
