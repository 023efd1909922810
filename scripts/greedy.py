"""The greedy-play table, docs/greedy.csv, from runs trained with --capture-video.

    python jepa_ppo_cartpole.py --seed 1 --save-model --capture-video --runs-dir runs/greedy
    python jepa_ppo_cartpole.py --seed 1 --total-timesteps 300000 --save-model --capture-video --runs-dir runs/greedy
    python scripts/greedy.py runs/greedy/*/ --out docs/greedy.csv

One row per run: its configuration and seed, the steps it trained, the mean return of its 10 greedy episodes
(`charts/greedy_return`: the most probable action at every step, one episode per environment), its final return
(the sampled episodes that end in the last 10k steps of its --total-timesteps, `plot.final_return`, as every table
reports it), and the command that repeats it (the script and the flags whose values differ from the defaults).
"""

import argparse
import os
import sys


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from plot import CONFIGURATIONS, command, final_return, read_events, write_csv  # noqa: E402


def greedy_row(run_dir: str) -> dict:
    run, flags = read_events(run_dir)
    if "charts/greedy_return" not in run:
        sys.exit(f"error: {run_dir} logged no charts/greedy_return: train it with --capture-video to the end")
    configuration = os.path.basename(os.path.normpath(run_dir)).split("__")[1]
    steps, returns = run["charts/episodic_return"]
    trained = int(run["charts/SPS"][0][-1])
    return {"configuration": next(label for name, label, _ in CONFIGURATIONS if name == configuration),
            "seed": int(flags["seed"]), "steps_trained": trained, "greedy_episodes": 10,
            "greedy_mean_return": round(float(run["charts/greedy_return"][1][-1]), 1),
            "final_return": round(final_return(steps, returns, int(flags["total_timesteps"])), 1),
            "command": command(flags)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dirs", nargs="+", help="run directories of runs trained with --capture-video")
    parser.add_argument("--out", default="docs/greedy.csv", help="the CSV to write")
    opts = parser.parse_args()
    rows = sorted((greedy_row(d) for d in opts.run_dirs), key=lambda r: (r["configuration"], r["seed"],
                                                                         r["steps_trained"]))
    write_csv(opts.out, rows)
    for row in rows:
        print(", ".join(f"{k} {v}" for k, v in row.items()))
