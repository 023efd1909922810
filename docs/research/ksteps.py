"""The prediction-horizon table (--jepa-steps K): per cell, an encoder's flags with one K, the final return, the AUC
and the steps to a running mean of 400 and of 475, seed by seed, and on how many seeds K's AUC is above K = 1's.

    pip install -r requirements-plots.txt                              # matplotlib, for the figure
    python docs/research/ksteps.py runs/ksteps --out docs/ksteps       # cells: runs/ksteps/<cell>/

Each subdirectory of the log directory is a cell: finished 100k-step runs of one configuration, one run per seed, with
one command but the seed. A cell's K is the --jepa-steps its runs logged; its encoder is the rest of that command; its
K = 1 cell is the one with the same encoder. The measures are scripts/plot.py's (final return: the episodes that end
in (90k, 100k]; AUC: the running mean of the last 20 episodes averaged over 0-100k steps). Writes <out>.csv (one row
per run, with its command) and <out>.png (the running mean, mean over seeds, a panel per encoder), and prints the
table and, per cell, the linear probes' R^2 at the end and the lowest embedding variance, as Markdown.
"""

import argparse
import glob
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts"))
import plot  # noqa: E402
from screen import mean_se  # noqa: E402


def horizon_and_encoder(command: str) -> tuple:
    """A run's command -> (its K, the command without the seed and K: what the cells of one encoder share)."""
    match = re.search(r" --jepa-steps (\d+)", command)
    rest = re.sub(r" --(seed|jepa-steps) \d+", "", command)
    return (int(match.group(1)) if match else 1), rest


def load_cells(logdir: str) -> list:
    """[{name, k, encoder, runs: {seed: plot.summarize_run's summary with run and command}}], one per subdirectory."""
    cells = []
    for cell_dir in sorted(glob.glob(os.path.join(logdir, "*", ""))):
        sweep = plot.load_sweep(cell_dir)
        name = os.path.basename(cell_dir.rstrip("/"))
        if not sweep:
            print(f"no finished run in {cell_dir}: left out")
            continue
        if len(sweep) != 1:
            sys.exit(f"error: {cell_dir} holds {len(sweep)} configurations' finished runs: a cell holds one")
        (runs,) = sweep.values()
        (k, encoder), *others = {horizon_and_encoder(runs[seed]["command"]) for seed in runs}
        if others:
            sys.exit(f"error: the runs in {cell_dir} differ in more than their seed: a cell is one command")
        cells.append({"name": name, "k": k, "encoder": encoder, "runs": runs})
    return cells


def fmt_steps(steps: float) -> str:
    return "-" if np.isinf(steps) else f"{steps / 1000:.1f}k"


def table(cells: list) -> str:
    """The Markdown table: a row per cell, by encoder then K; the lead column compares AUCs seed by seed."""
    baseline = {cell["encoder"]: cell for cell in cells if cell["k"] == 1}
    if len(baseline) < sum(cell["k"] == 1 for cell in cells):
        sys.exit("error: two K = 1 cells of one encoder: keep one")
    lines = ["| cell | K | seeds | final return per seed | final: mean +- s.e. | AUC per seed | AUC: mean +- s.e. | "
             "steps to 400 per seed | steps to 475 per seed | AUC above K = 1 on |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for cell in sorted(cells, key=lambda c: (c["encoder"], c["k"])):
        runs, seeds = cell["runs"], sorted(cell["runs"])
        per_seed = lambda key, f: " ".join(f(runs[s][key]) for s in seeds)
        one = baseline.get(cell["encoder"])
        shared = [s for s in seeds if one is not None and s in one["runs"]]
        lead = ("" if cell["k"] == 1 or not shared else
                f"{sum(runs[s]['auc'] > one['runs'][s]['auc'] for s in shared)} of {len(shared)} seeds")
        lines.append(f"| {cell['name']} | {cell['k']} | {' '.join(map(str, seeds))} "
                     f"| {per_seed('final_return', '{:.1f}'.format)} "
                     f"| {mean_se([runs[s]['final_return'] for s in seeds])} "
                     f"| {per_seed('auc', '{:.1f}'.format)} | {mean_se([runs[s]['auc'] for s in seeds])} "
                     f"| {per_seed('steps_to_400', fmt_steps)} | {per_seed('steps_to_475', fmt_steps)} | {lead} |")
    return "\n".join(lines)


PROBED = [f"{probe}r2_{name}" for probe in ["onpolicy_", ""] for name in plot.STATE_VARIABLES]


def probe_table(cells: list) -> str:
    """What the embedding holds at the end: the linear probes' R^2 (mean over seeds of each run's last 2 fits, on the
    states the policy visits / on the fixed probe set) and the lowest embedding variance (median over seeds)."""
    names = plot.STATE_VARIABLES
    lines = ["| cell | K | " + " | ".join(f"R^2 on-policy / fixed: {name.replace('_', ' ')}" for name in names)
             + " | lowest variance |", "|---|---|" + "---|" * (len(names) + 1)]
    for cell in sorted(cells, key=lambda c: (c["encoder"], c["k"])):
        mean = lambda key: np.mean([run[key] for run in cell["runs"].values()])
        r2 = " | ".join(f"{mean('onpolicy_r2_' + name):.2f} / {mean('r2_' + name):.2f}" for name in names)
        lowest = np.median([run["lowest_variance"] for run in cell["runs"].values()])
        lines.append(f"| {cell['name']} | {cell['k']} | {r2} | {lowest:.1e} |")
    return "\n".join(lines)


def run_rows(cells: list) -> list:
    keys = ["final_return", "auc", "steps_to_400", "steps_to_475", *PROBED, "lowest_variance", "run", "command"]
    return [{"cell": cell["name"], "k": cell["k"], "seed": seed, **{key: cell["runs"][seed][key] for key in keys}}
            for cell in sorted(cells, key=lambda c: (c["encoder"], c["k"])) for seed in sorted(cell["runs"])]


def figure(cells: list, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    encoders = sorted({cell["encoder"] for cell in cells})
    fig, axes = plt.subplots(1, len(encoders), figsize=(6 * len(encoders), 4), squeeze=False)
    for ax, encoder in zip(axes[0], encoders):
        for cell in sorted((c for c in cells if c["encoder"] == encoder), key=lambda c: c["k"]):
            curves = np.array([run["return_curve"] for run in cell["runs"].values()])
            line, = ax.plot(plot.GRID / 1000, curves.mean(0), label=f"K = {cell['k']} ({len(curves)} seeds)")
            for curve in curves:
                ax.plot(plot.GRID / 1000, curve, color=line.get_color(), alpha=0.25, linewidth=0.8)
        flags = encoder.split(".py", 1)[-1].replace(" --no-cuda", "").strip() or "the ViT's defaults"
        ax.set(title=flags, xlabel="environment steps (thousands)", ylabel="running mean return (20 episodes)",
               ylim=(0, 510))
        ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logdir", help="a directory of cells, each a directory of runs")
    parser.add_argument("--out", help="write <out>.csv and <out>.png")
    cli = parser.parse_args()
    cells = load_cells(cli.logdir)
    if not cells:
        sys.exit(f"error: no finished runs under {cli.logdir}")
    print(table(cells))
    print()
    print(probe_table(cells))
    if cli.out:
        plot.write_csv(f"{cli.out}.csv", run_rows(cells))
        figure(cells, f"{cli.out}.png")
        print(f"wrote {cli.out}.csv and {cli.out}.png")


if __name__ == "__main__":
    main()
