"""Tests of the Atari entry point, jepa_ppo_atari.py, on real ALE frames: `python -m pytest -q jepa_ppo_atari_test.py`
(needs requirements-atari.txt)."""

import glob
import os

import numpy as np
import pytest
import torch

import jepa_ppo_atari as atari
import jepa_ppo_cartpole as ref
from jepa_ppo_cartpole_test import CONFIGS, ROOT, TAGS, run_script, scalars

ATARI_SCRIPT = os.path.join(ROOT, "jepa_ppo_atari.py")
SMALL = dict(embed_dim=32, num_heads=2, depth=1, predictor_hidden=32)


def test_game_names_are_ale_pys_roms():
    assert [atari.game_name(f"ALE/{game}-v5") for game in ["Breakout", "MsPacman", "SpaceInvaders", "Pong"]] == [
        "breakout", "ms_pacman", "space_invaders", "pong"]
    assert atari.game_name("Breakout") == atari.game_name("ALE/Breakout-v4") == ""


def test_the_background_reads_zero_and_the_objects_do_not():
    """The encoder reads 1 - x / 255 of what the games return: 0 on the game's background, more on anything else.
    Pong's background is a gray of its own (87), which raw intensity or 255 - gray would not read as 0."""
    games = atari.AtariGames("ALE/Pong-v5", 2, 64, 64)
    frames, _ = games.reset(seed=0)
    encoder_reads = 1 - frames / 255.0
    assert frames.shape == (2, 64, 64) and frames.dtype == np.uint8 and games.background > 0
    assert (encoder_reads == 0).mean() > 0.5 and encoder_reads.max() > 0.2  # the walls and paddles stand out
    games.close()


def play(game, steps, seed=0):
    """Random play of two games: per step the raw rewards, terminated, lives, and the games that ended."""
    games = atari.AtariGames(game, 2, 64, 64)
    games.reset(seed)
    rng, record = np.random.default_rng(seed), []
    for _ in range(steps):
        frames, reward, terminated, truncated, info = games.step(rng.integers(0, games.num_actions, 2))
        record.append((reward, terminated, info))
    games.close()
    return record


def test_a_lost_life_ends_an_episode_for_training_and_a_game_over_ends_the_score():
    """Breakout, five lives: `terminated` on every lost life; the raw score and length of a game are reported once,
    at its end, and are the sum of its raw rewards and its number of steps."""
    record = play("ALE/Breakout-v5", 1500)
    terminations = sum(int(terminated.sum()) for _, terminated, _ in record)
    ended = [(step, n) for step, (_, _, info) in enumerate(record) if info for n in np.flatnonzero(info["_episode"])]
    assert len(ended) >= 2 and terminations >= 5 * len(ended)  # 5 lives a game
    for n in range(2):
        starts = [0] + [step + 2 for step, m in ended if m == n]  # the step after a game over starts the next game
        for (step, m), start in zip([(s, m) for s, m in ended if m == n], starts):
            raw = sum(record[t][0][n] for t in range(start, step + 1))
            assert record[step][2]["episode"]["r"][n] == raw and record[step][2]["episode"]["l"][n] == step + 1 - start


def test_rewards_are_clipped_for_training_only():
    """SpaceInvaders pays 5 to 30 a hit: the reward the loop trains on is its sign, the logged score the raw sum."""
    games = atari.AtariGames("ALE/SpaceInvaders-v5", 2, 64, 64)
    frames, _ = games.reset(seed=0)
    stack = torch.as_tensor(frames)[:, None].repeat(1, 3, 1, 1)
    is_reset_step, raw_seen, clipped_seen = torch.zeros(2, dtype=torch.bool), [], []
    for _ in range(300):
        raw_before = games.score.copy()
        _, reward, _, done, stack, info = atari.step_atari(games, torch.randint(0, games.num_actions, (2,)), stack,
                                                           is_reset_step)
        raw_seen.append(games.score - raw_before)
        clipped_seen.append(reward.numpy())
        is_reset_step = done
    games.close()
    raw, clipped = np.array(raw_seen), np.array(clipped_seen)
    assert raw.max() > 1 and set(np.unique(clipped)) <= {0.0, 1.0, -1.0}
    assert np.array_equal(clipped, np.sign(raw))


def test_rollout_stacks_targets_and_reset_rows_on_real_frames():
    """The reference's rollout and batch on Breakout: each row's stack is the last one shifted by a frame; the row
    after a lost life is a reset row that enters no loss, and the row after it starts a fresh stack; row t's JEPA target
    embeds row t + 1's stack."""
    args = atari.AtariArgs(num_envs=2, num_steps=96, **SMALL)
    games = atari.AtariGames(args.env_id, 2, 64, 64)
    frames = torch.as_tensor(games.reset(seed=0)[0])
    torch.manual_seed(0)
    encoder, target_encoder, predictor, actor, critic, _ = ref.make_agent(args, "cpu", num_actions=games.num_actions)
    rollout = ref.make_rollout_storage(96, 2, (3, 64, 64), args.embed_dim, "cpu")
    env_state = {"state": frames, "stack": frames[:, None].repeat(1, 3, 1, 1),
                 "is_reset_step": torch.zeros(2, dtype=torch.bool)}
    ref.collect_rollout(games, encoder, actor, critic, rollout, env_state, env_step=atari.step_atari)
    games.close()
    stacks, valid, dones = rollout["stacks"], rollout["valid"], rollout["dones"].bool()
    assert dones[:-2].any()
    assert torch.equal(valid[1:], ~dones[:-1])  # the row after a done is a reset row
    moved = 0
    for t in range(1, 97):
        for n in range(2):
            if not valid[t - 1, n]:  # after a reset row: a fresh stack, its frame three times
                assert torch.equal(stacks[t, n, 0], stacks[t, n, 1]) and torch.equal(stacks[t, n, 1], stacks[t, n, 2])
            else:
                assert torch.equal(stacks[t, n, :2], stacks[t - 1, n, 1:])
                moved += not torch.equal(stacks[t, n, 2], stacks[t - 1, n, 2])
    assert moved > 50  # real frames that change
    batch = ref.make_batch(args, rollout, encoder, target_encoder, critic)
    with torch.no_grad():
        expected = target_encoder(stacks[1:].flatten(0, 1))[valid.flatten()]
    assert len(batch["actions"]) == int(valid.sum()) and torch.equal(batch["targets"], expected)


@pytest.mark.parametrize("config", ["2", "3"])
def test_a_short_run_writes_the_reference_tags_with_raw_game_scores(config, tmp_path):
    result = run_script([*CONFIGS[config], "--total-timesteps", "512", "--num-envs", "2", "--num-steps", "128",
                         "--no-cuda", "--embed-dim", "32", "--num-heads", "2", "--depth", "1"], tmp_path,
                        script=ATARI_SCRIPT)
    assert result.returncode == 0, result.stderr
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    logged = scalars(run_dir)
    assert sorted(logged) == sorted(TAGS)
    assert [step for step, _ in logged["charts/learning_rate"]] == [256, 512]
    scores = [score for _, score in logged["charts/episodic_return"]]
    assert all(score >= 0 and score == int(score) for score in scores)  # Breakout's raw score, whole games


def test_k_step_prediction_runs_the_labs_loss_in_the_atari_loop(tmp_path):
    """--jepa-steps 3: the lab's K-step batch and loss in the Atari loop, each step's JEPA loss logged. A lost life
    ends an episode for training (a done, tested above), and the lab's tests check that no step crosses a done."""
    result = run_script([*CONFIGS["2"], "--jepa-steps", "3", "--total-timesteps", "512", "--num-envs", "2",
                         "--num-steps", "128", "--no-cuda", "--embed-dim", "32", "--num-heads", "2", "--depth", "1"],
                        tmp_path, script=ATARI_SCRIPT)
    assert result.returncode == 0, result.stderr
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    logged = scalars(run_dir)
    assert sorted(logged) == sorted([*TAGS, *(f"losses/jepa_loss_step{k}" for k in [1, 2, 3])])
    steps = np.array([[v for _, v in logged[f"losses/jepa_loss_step{k}"]] for k in [1, 2, 3]])
    jepa = np.array([v for _, v in logged["losses/jepa_loss"]])
    assert np.all((steps.min(0) < jepa) & (jepa < steps.max(0)))  # the K-step loss, not the first step's


@pytest.mark.parametrize("steps", ["0", "129"])
def test_a_bad_prediction_horizon_is_refused_in_one_line(steps, tmp_path):
    result = run_script(["--jepa-steps", steps], tmp_path, script=ATARI_SCRIPT)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "--jepa-steps" in result.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("env_id", ["ALE/Breakot-v5", "Breakout", "ALE/Breakout-v4", "breakout"])
def test_a_bad_env_id_is_refused_in_one_line_before_any_run_directory(env_id, tmp_path):
    result = run_script(["--env-id", env_id], tmp_path, script=ATARI_SCRIPT)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "--env-id" in result.stderr
    assert not (tmp_path / "runs").exists()
