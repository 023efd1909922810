"""Per-seed final returns and AUCs from the CSVs of scripts/plot.py, each alone and pooled: the mean and its 95%
Student t interval per configuration. A runs.csv gives each run's values as logged; a results.csv only its per-seed
columns, rounded to 0.1 (for sweeps whose runs.csv was not kept).

    python scripts/pool.py docs/runs.csv+docs/results_unseen.csv docs/results_c569acb.csv --out docs/intervals.csv

Each argument is a CSV, or CSVs joined by "+" to pool: every CSV gets its own rows, then each configuration that two
or more CSVs of a group hold is pooled over them (their seeds must not overlap).
"""

import argparse
import csv
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from plot import CONFIGURATIONS, t_interval, write_csv  # noqa: E402


def read_seeds(path: str) -> dict:
    """{configuration label: {seed: (final return, AUC)}} from a runs.csv, or a results.csv's per-seed columns."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0]) if rows else set()
    table = {}
    if {"configuration", "seed", "final_return", "auc"} <= columns:
        for row in rows:
            runs = table.setdefault(row["configuration"], {})
            runs[int(row["seed"])] = (float(row["final_return"]), float(row["auc"]))
    elif {"configuration", "seeds", "final_returns", "aucs"} <= columns:
        for row in rows:
            table[row["configuration"]] = {int(seed): (float(final), float(auc)) for seed, final, auc in
                                           zip(row["seeds"].split(), row["final_returns"].split(), row["aucs"].split())}
    else:
        sys.exit(f"error: {path} has neither a runs.csv's columns (configuration, seed, final_return, auc) nor a "
                 f"results.csv's per-seed ones (configuration, seeds, final_returns, aucs)")
    return table


def summary_row(source: str, label: str, runs: dict) -> dict:
    seeds = sorted(runs)
    finals, aucs = np.array([runs[s][0] for s in seeds]), np.array([runs[s][1] for s in seeds])
    interval = lambda x: "[{:.1f}, {:.1f}]".format(*t_interval(x))
    return {"source": source, "configuration": label, "seeds": " ".join(map(str, seeds)), "n": len(seeds),
            "final_return_mean": round(finals.mean(), 1), "final_return_t95": interval(finals),
            "auc_mean": round(aucs.mean(), 1), "auc_t95": interval(aucs)}


def pooled_rows(paths: list) -> list:
    """The rows of one group of CSVs: each CSV's, then the pooled ones."""
    tables = {path: read_seeds(path) for path in paths}
    rows = [summary_row(path, label, runs) for path, table in tables.items() for label, runs in table.items()]
    for _, label, _ in CONFIGURATIONS:
        holding = [path for path in paths if label in tables[path]]
        if len(holding) < 2:
            continue
        runs = {}
        for path in holding:
            if set(runs) & set(tables[path][label]):
                sys.exit(f"error: {path} repeats seeds of {label} already read: pool only disjoint seeds")
            runs.update(tables[path][label])
        rows.append(summary_row(" + ".join(holding), label, runs))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("groups", nargs="+", help="results CSVs of scripts/plot.py; A.csv+B.csv pools A and B")
    parser.add_argument("--out", help="the CSV to write (default: print only)")
    opts = parser.parse_args()
    rows = [row for group in opts.groups for row in pooled_rows(group.split("+"))]
    if opts.out:
        write_csv(opts.out, rows)
    for row in rows:
        print(", ".join(f"{k} {v}" for k, v in row.items()))
