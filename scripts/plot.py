"""Figure 3 and the results table from the TensorBoard logs of a sweep (see scripts/reproduce.sh).

    pip install -r requirements-plots.txt        # matplotlib, for the figures; the training files do not need it
    python scripts/plot.py runs/reproduce --out docs

Reads every run directory under the log directory (names: <exp>__<configuration>__s<seed>__<time>), and
writes <out>/figure3.png (the paper's Figure 3: return and embedding variance), <out>/diagnostics.png (twelve
panels: also the effective rank, the JEPA loss and the probes), <out>/results.csv (per configuration) and
<out>/runs.csv (per run, with the command that repeats it), and prints the table as Markdown. Per run:
  final return    mean return of the episodes that end in the last 10k steps of the run's --total-timesteps:
                  (90k, 100k] for the paper's budget; `final_return` below, the one definition every script uses
  steps to 400    first step at which the running mean of the last 20 episodes reaches 400 (a full window of
                  20 episodes); steps to 475 the same for 475, Gymnasium's reward threshold for CartPole-v1
  AUC             the running mean return averaged over steps 0-100k (area under the curve / 100k)
  variance        embedding/variance averaged over the last 10 iterations (about 2.5k steps); lowest: its
                  minimum over the run (per run in runs.csv; results.csv: the median and the lowest over seeds);
                  the same for embedding/variance_pre_ln, the CLS output before the final LayerNorm (logs from
                  before that tag show nan); collapsed: the iterations whose embedding/variance is under 1e-7
  R^2             the last 2 fits (the last 5k steps) of the two linear probes: probe/onpolicy_r2_* on the
                  states the policy visits, probe/r2_* on the fixed probe set spread over the state space
Per configuration: mean and sample standard deviation over seeds (median for steps to 400), and for the
final return and the AUC the interquartile mean (IQM: the mean of the middle half of the seeds, as scipy's
trim_mean(x, 0.25)) and the 95% Student t interval of the mean (mean +- t(0.975, n - 1) s / sqrt(n)). A
percentile bootstrap over five seeds is too narrow (it ignores that s is itself estimated from five values), so
no interval is given for the IQM. The figure's bands are the same t interval of the mean, per step.
Two runs of one configuration with the same seed in one log directory stop the script: move one away.
"""

import argparse
import csv
import glob
import os
import sys
from collections import deque

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import jepa_ppo_cartpole as ref  # noqa: E402
import jepa_ppo_atari as atari  # noqa: E402
import jepa_ppo_cartpole_lab as lab  # noqa: E402

# one colour per configuration in every figure the scripts draw
COLORS = {"nojepa-rlgrad-novar": "tab:gray", "jepa-rlgrad-novar": "tab:blue", "jepa-norlgrad-novar": "tab:red",
          "jepa-norlgrad-var": "tab:green"}
# the paper's return at 100k steps read off its Figure 3, as (low, high), for the figure's marks
PAPER_LEVELS = {"nojepa-rlgrad-novar": (40, 50), "jepa-rlgrad-novar": (100, 100), "jepa-norlgrad-novar": (20, 20)}
# (name in the run directory, label, the paper's return at 100k steps read off its Figure 3)
CONFIGURATIONS = [
    ("nojepa-rlgrad-novar", "1: RL gradient only", "40-50"),
    ("jepa-rlgrad-novar", "2: JEPA + RL gradient", "~100"),
    ("jepa-norlgrad-novar", "3: JEPA only", "~20 (collapse)"),
    ("jepa-norlgrad-var", "4: JEPA + variance loss", "learns, slower than 2"),
]
STATE_VARIABLES = ["cart_position", "cart_velocity", "pole_angle", "pole_velocity"]
PROBES = {"onpolicy_": "on-policy probe", "": "fixed-set probe"}  # tag prefix -> title
HORIZON = 100_000  # the paper's budget; --steps sets another for a shorter look
GRID = np.arange(0, HORIZON + 1, HORIZON // 100)  # steps at which curves are compared across seeds
LOG_AXIS = ("variance_curve", "jepa_loss_curve")  # drawn on a log axis, their mean over seeds geometric
# Student t's 0.975 quantile by degrees of freedom, as tables print it (scipy.stats.t.ppf(0.975, df), 3 decimals);
# beyond 30, the Cornish-Fisher expansion around the normal's 1.96 (off by under 1e-4)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086,
         21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042}


def t_975(df: int) -> float:
    z = 1.959964
    return T_975.get(df) or z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def iqm(x, axis=-1):
    """Interquartile mean: drop the lowest and highest quarter (floor(n / 4) values each), average the rest."""
    x = np.sort(x, axis=axis)
    cut = x.shape[axis] // 4
    return np.take(x, np.arange(cut, x.shape[axis] - cut), axis=axis).mean(axis=axis)


def t_interval(values):
    """95% Student t interval of the mean of `values` (seeds, ...) along axis 0: (low, high); nan for one value."""
    values = np.asarray(values, dtype=float)
    n = len(values)
    if n < 2:
        return np.full((2, *values.shape[1:]), np.nan)
    half = t_975(n - 1) * values.std(axis=0, ddof=1) / np.sqrt(n)
    return np.stack([values.mean(axis=0) - half, values.mean(axis=0) + half])


def final_return(steps, returns, total_timesteps):
    """The mean return of the episodes that end in the last 10k steps of a run of `total_timesteps`, (T - 10k, T];
    nan if none. A run ends at the last whole iteration (99,840 of 100k), so its window holds 9,840 steps."""
    in_window = (steps > total_timesteps - 10_000) & (steps <= total_timesteps)
    return float(returns[in_window].mean()) if in_window.any() else float("nan")


def read_events(run_dir):
    """A run's event files, read once: {tag: (steps, values)} of its scalars, and {flag: value as text} from the
    hyperparameters table it logs at its start (empty if it logged none)."""
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = lambda tag: (np.array([e.step for e in acc.Scalars(tag)]), np.array([e.value for e in acc.Scalars(tag)]))
    flags = {}
    if "hyperparameters/text_summary" in acc.Tags()["tensors"]:
        table = tensor_util.make_ndarray(acc.Tensors("hyperparameters/text_summary")[0].tensor_proto).item().decode()
        flags = dict(line.strip("|").split("|", 1) for line in table.splitlines()[2:])
    return {tag: scalars(tag) for tag in acc.Tags()["scalars"]}, flags


NOT_IN_COMMAND = {"exp_name", "runs_dir"}  # where a run writes, not what it computes


def command(flags: dict) -> str:
    """The command that repeats a run from the flags it logged: the lab's or the Atari entry point's script if it logged
    their flags, else the reference's, with the seed and each flag whose value is not the default's, on one thread as
    every run here."""
    script, args = ("jepa_ppo_cartpole.py", ref.Args())
    if "encoder" in flags:
        script, args = "jepa_ppo_cartpole_lab.py", lab.LabArgs()
    if "env_id" in flags:
        script, args = "jepa_ppo_atari.py", atari.AtariArgs()
    parts = [f"OMP_NUM_THREADS=1 python {script}"]
    for name, default in vars(args).items():
        if name in NOT_IN_COMMAND or name not in flags or (flags[name] == str(default) and name != "seed"):
            continue
        flag = name.replace("_", "-")
        if isinstance(default, bool):
            parts.append(f"--{flag}" if flags[name] == "True" else f"--no-{flag}")
        else:
            parts.append(f"--{flag} {flags[name]}")
    return " ".join(parts)


def read_run(run_dir):
    return read_events(run_dir)[0]


def running_mean(steps, returns, window=20):
    recent, means = deque(maxlen=window), []
    for r in returns:
        recent.append(r)
        means.append(np.mean(recent))
    return steps, np.array(means)


def steps_to(rm_steps, rm, threshold):
    """First step at which a full window of 20 episodes averages `threshold` or more; inf if never."""
    reached = np.flatnonzero((rm >= threshold) & (np.arange(len(rm)) >= 19))
    return float(rm_steps[reached[0]]) if len(reached) else float("inf")


def summarize_run(run):
    steps, returns = run["charts/episodic_return"]
    rm_steps, rm = running_mean(steps, returns)
    curve = np.interp(GRID, rm_steps, rm, left=rm[0])
    summary = {
        "final_return": final_return(steps, returns, HORIZON),
        "steps_to_400": steps_to(rm_steps, rm, 400),
        "steps_to_475": steps_to(rm_steps, rm, 475),
        "auc": float(curve.mean()),
        "return_curve": curve,
        "variance": float(run["embedding/variance"][1][-10:].mean()),
        "lowest_variance": float(run["embedding/variance"][1].min()),
        "collapsed": int(run["embedding/collapsed"][1].sum()) if "embedding/collapsed" in run else -1,
        "iterations": len(run["embedding/variance"][1]),
    }
    pre_ln = run.get("embedding/variance_pre_ln", (np.array([0.0]), np.array([np.nan])))
    summary["variance_pre_ln"], summary["lowest_variance_pre_ln"] = float(pre_ln[1][-10:].mean()), float(pre_ln[1].min())
    summary["variance_pre_ln_curve"] = np.interp(GRID, *pre_ln)
    for tag in ["embedding/variance", "embedding/effective_rank", "losses/jepa_loss"]:  # the lab logs the rank
        summary[f"{tag.split('/')[1]}_curve"] = np.interp(GRID, *run.get(tag, (np.array([0.0]), np.array([np.nan]))))
    for probe in PROBES:
        for name in STATE_VARIABLES:
            # the reference logs no probes (the lab does): their columns are then NaN
            steps_r2, r2 = run.get(f"probe/{probe}r2_{name}", (np.array([0.0]), np.array([np.nan])))
            summary[f"{probe}r2_{name}"] = float(r2[-2:].mean())
            summary[f"{probe}r2_curve_{name}"] = np.interp(GRID, steps_r2, r2)
    return summary


def load_sweep(logdir):
    finished = {}  # (configuration, seed) -> (run directory, its scalars)
    for run_dir in sorted(glob.glob(os.path.join(logdir, "*__*__s*__*"))):
        configuration, seed = os.path.basename(run_dir).split("__")[1:3]
        run, flags = read_events(run_dir)
        if "charts/SPS" not in run or run["charts/SPS"][0][-1] < 0.99 * HORIZON:
            print(f"skipped, not finished: {run_dir}")
            continue
        if (configuration, seed) in finished:
            sys.exit(f"error: two finished runs of {configuration} with {seed} in {logdir} ({finished[configuration, seed][0]} "
                     f"and {run_dir}); a sweep holds one run per configuration and seed: move one away")
        finished[configuration, seed] = (run_dir, run, flags)
    sweep = {}
    for (configuration, seed), (run_dir, run, flags) in finished.items():
        summary = {**summarize_run(run), "run": os.path.basename(run_dir), "command": command(flags)}
        sweep.setdefault(configuration, {})[int(seed[1:])] = summary
    return sweep


def write_csv(path: str, rows: list):
    """Rows of dicts (one set of keys) to a CSV with a header."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


RUN_COLUMNS = ["final_return", "auc", "steps_to_400", "steps_to_475", "variance", "lowest_variance", "collapsed",
               "iterations", "variance_pre_ln", "lowest_variance_pre_ln", "run", "command"]


def run_rows(sweep):
    """One row per run, in the order of the configurations, then seeds."""
    return [{"configuration": label, "seed": seed, **{key: runs[seed][key] for key in RUN_COLUMNS}}
            for configuration, label, _ in CONFIGURATIONS for runs in [sweep.get(configuration, {})]
            for seed in sorted(runs)]


def table_rows(sweep, paper=True):
    rows = []
    for configuration, label, paper_return in CONFIGURATIONS:
        runs = sweep.get(configuration)
        if not runs:
            continue
        col = lambda key: np.array([run[key] for run in runs.values()])
        finals, to_400, to_475 = col("final_return"), col("steps_to_400"), col("steps_to_475")
        reached = np.isfinite(to_400)
        interval = lambda x: "[{:.1f}, {:.1f}]".format(*t_interval(x))
        rows.append({
            "configuration": label,
            "seeds": " ".join(str(s) for s in runs),
            "paper_return_100k": paper_return if paper else "",
            "final_return_mean": round(finals.mean(), 1),
            "final_return_std": round(finals.std(ddof=1), 1) if len(finals) > 1 else float("nan"),
            "final_returns": " ".join(f"{f:.1f}" for f in finals),
            "final_return_mean_ci95": interval(finals),
            "final_return_iqm": round(float(iqm(finals)), 1),
            "median_steps_to_400": np.median(to_400) if reached.any() else "never",
            "runs_reaching_400": f"{reached.sum()}/{len(to_400)}",
            "aucs": " ".join(f"{a:.1f}" for a in col("auc")),
            "auc_mean": round(col("auc").mean(), 1),
            "auc_mean_ci95": interval(col("auc")),
            "auc_iqm": round(float(iqm(col("auc"))), 1),
            "embedding_variance": f"{np.mean(col('variance')):.2e}",
            "lowest_embedding_variance": f"{np.median(col('lowest_variance')):.1e}",
            "lowest_embedding_variance_of_all_seeds": f"{col('lowest_variance').min():.1e}",
            "collapsed_iterations": f"{col('collapsed').sum()}/{col('iterations').sum()}",
            "variance_pre_ln": f"{np.median(col('variance_pre_ln')):.2e}",
            "lowest_variance_pre_ln": f"{np.median(col('lowest_variance_pre_ln')):.1e}",
            **{f"{probe}r2_{name}": round(col(f"{probe}r2_{name}").mean(), 2) for probe in PROBES for name in STATE_VARIABLES},
            "median_steps_to_475": np.median(to_475) if np.isfinite(to_475).any() else "never",
            "runs_reaching_475": f"{np.isfinite(to_475).sum()}/{len(to_475)}",
        })
    return rows


def markdown(rows):
    header = ("| configuration | paper, return at 100k | final return: mean +- std [95% CI] | final return: IQM "
              "| median steps to 400 (runs) | median steps to 475 (runs) | AUC: mean [95% CI] | AUC: IQM "
              "| embedding variance: final, lowest (median; of all seeds) | collapsed iterations | pre-LN variance: final, lowest | R^2 on-policy / fixed set: cart pos. | cart vel. | pole angle | pole vel. |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        to_400 = r["median_steps_to_400"]
        to_400 = to_400 if isinstance(to_400, str) else f"{to_400 / 1000:.1f}k" if np.isfinite(to_400) else "-"
        to_475 = r["median_steps_to_475"]
        to_475 = to_475 if isinstance(to_475, str) else f"{to_475 / 1000:.1f}k" if np.isfinite(to_475) else "-"
        lines.append(f"| {r['configuration']} | {r['paper_return_100k']} | {r['final_return_mean']} +- {r['final_return_std']} "
                     f"{r['final_return_mean_ci95']} | {r['final_return_iqm']} "
                     f"| {to_400} ({r['runs_reaching_400']}) | {to_475} ({r['runs_reaching_475']}) | {r['auc_mean']} {r['auc_mean_ci95']} | {r['auc_iqm']} "
                     f"| {r['embedding_variance']}, {r['lowest_embedding_variance']}; {r['lowest_embedding_variance_of_all_seeds']} | {r['collapsed_iterations']} | "
                     f"{r['variance_pre_ln']}, {r['lowest_variance_pre_ln']} | "
                     + " | ".join(f"{r[f'onpolicy_r2_{name}']} / {r[f'r2_{name}']}" for name in STATE_VARIABLES) + " |")
    return "\n".join(lines)


def plot(sweep, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 4, figsize=(18, 11), constrained_layout=True)
    panels = [("return_curve", "running mean return (last 20 episodes)"), ("variance_curve", "embedding/variance (dashed: before the final LayerNorm)"),
              ("effective_rank_curve", "embedding/effective_rank"), ("jepa_loss_curve", "losses/jepa_loss")]
    panels += [(f"{probe}r2_curve_{name}", f"{title} R^2: {name.replace('_', ' ')}") for probe, title in PROBES.items()
               for name in STATE_VARIABLES]
    for ax, (key, title) in zip(axes.flat, panels):
        for configuration, label, _ in CONFIGURATIONS:
            if configuration not in sweep:
                continue
            color = COLORS[configuration]
            curves = np.stack([run[key] for run in sweep[configuration].values()])
            center = np.exp(np.log(curves).mean(0)) if key in LOG_AXIS else curves.mean(0)
            ax.plot(GRID, center, color=color, label=label)
            if key in LOG_AXIS:  # the interval of the geometric mean
                low, high = np.exp(t_interval(np.log(curves)))
            else:
                low, high = t_interval(curves)
            ax.fill_between(GRID, low, high, color=color, alpha=0.2)
            if key == "variance_curve":  # the CLS output before the final LayerNorm, dashed
                pre_ln = np.stack([run["variance_pre_ln_curve"] for run in sweep[configuration].values()])
                ax.plot(GRID, np.exp(np.log(pre_ln).mean(0)), color=color, linestyle="--", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("environment steps")
        if key in LOG_AXIS:
            ax.set_yscale("log")
        if key == "variance_curve":
            ax.axhline(1e-7, color="black", linestyle="--", linewidth=1, label="collapse (1e-7)")
        if "r2_curve" in key:
            ax.set_ylim(-0.5, 1.0)
    axes.flat[0].legend(loc="upper left")
    axes.flat[1].legend(loc="lower left", fontsize=8)
    fig.suptitle("JEPA + PPO on CartPole from pixels: mean over seeds (line), 95% t interval of the mean (band)")
    fig.savefig(path, dpi=110)


def plot_paper(sweep, path, paper=True):
    """The paper's Figure 3: the running mean return and the embedding variance of the four configurations, the
    paper's returns at 100k steps marked, the collapse threshold drawn; readable at a page's width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_return, ax_variance) = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    seeds = sorted({len(runs) for runs in sweep.values()})
    for configuration, label, _ in CONFIGURATIONS:
        if configuration not in sweep:
            continue
        color, runs = COLORS[configuration], sweep[configuration].values()
        returns, variances = np.stack([run["return_curve"] for run in runs]), np.stack([run["variance_curve"] for run in runs])
        ax_return.plot(GRID / 1000, returns.mean(0), color=color, label=label)
        ax_return.fill_between(GRID / 1000, *t_interval(returns), color=color, alpha=0.2)
        ax_variance.plot(GRID / 1000, np.exp(np.log(variances).mean(0)), color=color)
        ax_variance.fill_between(GRID / 1000, *np.exp(t_interval(np.log(variances))), color=color, alpha=0.2)
        if paper and configuration in PAPER_LEVELS and HORIZON == 100_000:  # the paper's level at 100k: a bar or a dot
            low, high = PAPER_LEVELS[configuration]
            ax_return.plot([103, 103], [low, high + 0.5], color=color, linewidth=4, solid_capstyle="butt")
            ax_return.plot(103, (low + high) / 2, marker="<", color=color, markersize=7)
    ax_return.set_xlim(0, 1.06 * HORIZON / 1000)
    marks = "; arrows: the paper's returns at 100k" if paper and HORIZON == 100_000 else ""
    ax_return.set_xlabel(f"environment steps (thousands){marks}")
    ax_return.set_ylabel("running mean return (last 20 episodes)")
    seeds_each = f"{' or '.join(map(str, seeds))} seed{'s' if max(seeds) > 1 else ''} each"
    ax_return.legend(loc="upper left", fontsize="small", title=f"{seeds_each}; band: 95% t interval", title_fontsize="small")
    ax_variance.axhline(1e-7, color="black", linestyle="--", linewidth=1)
    ax_variance.text(2, 1.6e-7, "collapse (the paper's 1e-7)", fontsize="small")
    ax_variance.set_yscale("log")
    ax_variance.set_xlabel("environment steps (thousands)")
    ax_variance.set_ylabel("embedding variance (geometric mean)")
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("logdir", help="directory holding the sweep's run directories")
    parser.add_argument("--out", default="docs", help="where figure3.png and results.csv go")
    parser.add_argument("--no-paper", action="store_true", help="a sweep of another task (Atari): no marks or column "
                        "of the paper's CartPole returns")
    parser.add_argument("--per-run", action="store_true", help="also print each run's final return and steps to 400")
    parser.add_argument("--steps", type=int, default=HORIZON, help="the runs' --total-timesteps (final return: the "
                        "last 10k steps; AUC over all), for sweeps shorter than the paper's 100k")
    opts = parser.parse_args()
    HORIZON, GRID = opts.steps, np.arange(0, opts.steps + 1, opts.steps // 100)
    sweep = load_sweep(opts.logdir)
    if opts.per_run:
        for configuration, runs in sweep.items():
            for seed, run in runs.items():
                print(f"{configuration} seed {seed}: final return {run['final_return']:.1f}, steps to 400 "
                      f"{run['steps_to_400']:.0f}, to 475 {run['steps_to_475']:.0f}, AUC {run['auc']:.1f}, variance {run['variance']:.2e}, R^2 pole angle "
                      f"{run['r2_pole_angle']:.2f} (on-policy {run['onpolicy_r2_pole_angle']:.2f}), cart position "
                      f"{run['r2_cart_position']:.2f} (on-policy {run['onpolicy_r2_cart_position']:.2f})")
    rows = table_rows(sweep, paper=not opts.no_paper)
    os.makedirs(opts.out, exist_ok=True)
    write_csv(os.path.join(opts.out, "results.csv"), rows)
    write_csv(os.path.join(opts.out, "runs.csv"), run_rows(sweep))
    plot(sweep, os.path.join(opts.out, "diagnostics.png"))
    plot_paper(sweep, os.path.join(opts.out, "figure3.png"), paper=not opts.no_paper)
    print(markdown(rows))
