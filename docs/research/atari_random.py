"""The random policy's raw game score under the Atari entry point's protocol (jepa_ppo_atari.py's AtariGames: frameskip
4, no sticky actions, up to 30 no-op starts, fire reset, at most 108k frames a game), uniform actions.

    python docs/research/atari_random.py --games Breakout KungFuMaster --out docs/atari_random.csv

Plays 8 games at a time, --episodes / 8 whole games in each of the 8 slots (the first games to end in a slot, not in
all slots: the first to end anywhere would favour short, low-scoring games), or as many as end in --max-steps agent
steps; prints and writes the mean, standard deviation and number of games.
"""

import argparse
import csv
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import jepa_ppo_atari as atari  # noqa: E402


def random_scores(game: str, episodes: int, seed: int, max_steps: int, num_envs: int = 8) -> list:
    games = atari.AtariGames(f"ALE/{game}-v5", num_envs, 64, 64)
    games.reset(seed)
    rng, per_slot = np.random.default_rng(seed), [[] for _ in range(num_envs)]
    for _ in range(max_steps):
        _, _, _, _, info = games.step(rng.integers(0, games.num_actions, num_envs))
        for n in np.flatnonzero(info.get("_episode", [])):
            per_slot[n].append(float(info["episode"]["r"][n]))
        if min(map(len, per_slot)) >= episodes // num_envs:
            break
    games.close()
    return [score for slot in per_slot for score in slot[:episodes // num_envs]]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--games", nargs="+", required=True, help="game names as in ALE/<Game>-v5")
    parser.add_argument("--episodes", type=int, default=32, help="whole games to average")
    parser.add_argument("--max-steps", type=int, default=100_000, help="agent steps per game slot at most")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="the CSV to write")
    opts = parser.parse_args()
    rows = []
    for game in opts.games:
        scores = random_scores(game, opts.episodes, opts.seed, opts.max_steps)
        rows.append({"game": game, "games_played": len(scores), "random_score_mean": round(float(np.mean(scores)), 1),
                     "random_score_std": round(float(np.std(scores, ddof=1)), 1), "seed": opts.seed,
                     "command": f"python docs/research/atari_random.py --games {game} --episodes {opts.episodes} "
                                f"--seed {opts.seed}"})
        print(", ".join(f"{k} {v}" for k, v in rows[-1].items()), flush=True)
    if opts.out:
        with open(opts.out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
