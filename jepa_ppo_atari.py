"""PPO + JEPA on Atari from the reference's pieces: the paper's method on the games it was written for, under the
Atari 100k protocol (Kaiser et al. 2019; SPR, DrQ and BBF use it).

    pip install -r requirements-atari.txt                        # ale-py, with its ROMs
    python jepa_ppo_atari.py --env-id ALE/Breakout-v5            # configuration 2; the three switches as ever

The reference's (jepa_ppo_cartpole.py) ViT, predictor, EMA update, JEPA and variance losses, rollout, batch, PPO
update and logs run unchanged; this file brings the games and the hyperparameters of CleanRL's ppo_atari.py, shared
by the four configurations. `--jepa-steps K` swaps in the lab's K-step JEPA loss (jepa_ppo_cartpole_lab.py).
    protocol  100k agent steps (400k frames); frameskip 4 with max-pooling, no sticky actions, up to 30 no-op starts,
              fire reset, at most 108k frames a game (ale-py's vectorized ALE does all of it in C++)
    episodes  a lost life ends an episode for training only (no bootstrap across it, a fresh frame stack), rewards
              are clipped to their sign for training only; charts/episodic_return is the raw score of whole games
    frames    64 x 64 grayscale; the encoder reads frames (t-2, t-1, t), the y-encoder (t-1, t, t+1), as on CartPole
    ink       each pixel as its distance from the game's background gray (the commonest level of the first frame):
              the background reads 0, as CartPole's white does
"""

import os
import re
import sys
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

import jepa_ppo_cartpole as ref
import jepa_ppo_cartpole_lab as lab


@dataclass
class AtariArgs(ref.Args):
    exp_name: str = "jepa_ppo_atari"
    """the name of this experiment (first part of the run directory's name)"""
    env_id: str = "ALE/Breakout-v5"
    """the game, as Gymnasium names it: ALE/<Game>-v5, any of the ROMs that ale-py ships"""
    # CleanRL's ppo_atari.py, where it differs from the reference's CartPole values
    learning_rate: float = 2.5e-4
    """the learning rate of the Adam optimizer (CleanRL's ppo_atari.py)"""
    num_steps: int = 128
    """the number of steps per environment per rollout (CleanRL's ppo_atari.py)"""
    gamma: float = 0.99
    """the discount factor gamma (CleanRL's ppo_atari.py)"""
    gae_lambda: float = 0.95
    """the lambda of generalized advantage estimation (CleanRL's ppo_atari.py)"""
    clip_coef: float = 0.1
    """the PPO surrogate clipping coefficient (CleanRL's ppo_atari.py)"""
    ent_coef: float = 0.01
    """coefficient of the entropy bonus (CleanRL's ppo_atari.py)"""
    lr_warmup_iters: int = 0
    """iterations of learning-rate warm-up (CleanRL's ppo_atari.py has none; 100k steps are 97 iterations)"""
    frame_height: int = 64
    """height of a frame in pixels (ALE's 210 rows, resized)"""
    frame_width: int = 64
    """width of a frame in pixels (ALE's 160 columns, resized)"""
    # Beyond the paper, from the lab
    jepa_steps: int = 1
    """prediction horizon K, as the lab's --jepa-steps: the predictor rolled K steps against stacks t+1 ... t+K"""


def game_name(env_id: str) -> str:
    """ALE/<Game>-v5 -> ale-py's ROM name (Breakout -> breakout, MsPacman -> ms_pacman); "" if not of that form."""
    match = re.fullmatch(r"ALE/([A-Z][A-Za-z0-9]*)-v5", env_id)
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", match.group(1)).lower() if match else ""


def check_atari_args(args: AtariArgs) -> "str | None":
    """The reference's checks, then the game's: a one-line error naming the flag, or None."""
    from ale_py.roms import get_all_rom_ids

    if error := ref.check_args(args) or lab.check_jepa_steps(args):
        return error
    if game_name(args.env_id) not in get_all_rom_ids():
        return (f"--env-id must be ALE/<Game>-v5 for one of ale-py's ROMs (ALE/Breakout-v5, ALE/Pong-v5, ...), "
                f"got {args.env_id}")
    if args.capture_video:
        return "--capture-video plays CartPole greedily; on Atari, charts/episodic_return logs every whole game's score"
    return None


class AtariGames:
    """ale-py's vectorized ALE under the Atari 100k protocol, seen as frames: `step` returns each game's frame as ink,
    the raw reward, `terminated` on a lost life or at game over, and, in `info`, the raw score and length (agent steps)
    of the games that ended, in the layout of Gymnasium's RecordEpisodeStatistics. NEXT_STEP autoreset: the step after
    a game over starts the next game."""

    def __init__(self, env_id: str, num_envs: int, height: int, width: int):
        from ale_py.vector_env import AtariVectorEnv

        self.envs = AtariVectorEnv(game_name(env_id), num_envs, img_height=height, img_width=width, stack_num=1,
                                   frameskip=4, maxpool=True, noop_max=30, use_fire_reset=True,
                                   repeat_action_probability=0.0, max_num_frames_per_episode=108_000,
                                   reward_clipping=False, life_loss_info=True, num_threads=1)
        self.num_actions = int(self.envs.single_action_space.n)
        self.score, self.length = np.zeros(num_envs), np.zeros(num_envs, dtype=np.int64)
        self.starting = np.zeros(num_envs, dtype=bool)  # this step restarts a game that ended at the last one

    def ink(self, obs: np.ndarray) -> np.ndarray:
        """(N, 1, H, W) gray -> (N, H, W) uint8 255 - |gray - background|, which the reference's ViT reads as
        |gray - background| / 255 (it reads 1 - x / 255, the ink on CartPole's white)."""
        return (255 - np.abs(obs[:, 0].astype(np.int16) - self.background)).astype(np.uint8)

    def reset(self, seed: int):
        obs, info = self.envs.reset(seed=seed)
        self.background = int(np.bincount(obs[0, 0].ravel()).argmax())
        return self.ink(obs), info

    def step(self, action: np.ndarray):
        obs, reward, terminated, truncated, info = self.envs.step(action)
        self.score[self.starting], self.length[self.starting] = 0.0, 0
        self.score += reward
        self.length += ~self.starting
        game_over = (terminated & (info["lives"] == 0)) | truncated
        ended = {"_episode": game_over, "episode": {"r": self.score.copy(), "l": self.length.copy()}}
        self.starting = game_over
        return self.ink(obs), reward, terminated, truncated, ended if game_over.any() else {}

    def close(self):
        self.envs.close()


def step_atari(games: AtariGames, action, stack, is_reset_step):
    """The reference's `step_envs` for Atari: one step of every game -> (frames, reward clipped to its sign,
    terminated, done, next stack, info), tensors; the step after a done starts a fresh stack of its frame."""
    frames, reward, terminated, truncated, info = games.step(action.cpu().numpy())
    tensor = lambda array, dtype=None: torch.as_tensor(array, dtype=dtype, device=stack.device)
    frames, done = tensor(frames), tensor(terminated | truncated)
    next_stack = ref.push_frame(stack, frames, is_reset_step)
    return frames, tensor(np.sign(reward), torch.float32), tensor(terminated, torch.float32), done, next_stack, info


if __name__ == "__main__":
    args = ref.parse_args(args_class=AtariArgs, check=check_atari_args)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    make_games = lambda num_envs: AtariGames(args.env_id, num_envs, args.frame_height, args.frame_width)
    run_dir, writer, games, first_frames = ref.start_run(args, device, make_envs=make_games)
    encoder, target_encoder, predictor, actor, critic, optimizer = ref.make_agent(args, device,
                                                                                  num_actions=games.num_actions)
    H, W, batch_size = args.frame_height, args.frame_width, args.num_envs * args.num_steps
    num_iterations = args.total_timesteps // batch_size
    rollout = ref.make_rollout_storage(args.num_steps, args.num_envs, (3, H, W), args.embed_dim, device)
    env_state = {"state": first_frames, "stack": first_frames[:, None].repeat(1, 3, 1, 1),
                 "is_reset_step": torch.zeros(args.num_envs, dtype=torch.bool, device=device)}
    make_batch, losses_fn = ((lab.multistep_batch, lab.multistep_losses) if args.jepa_steps > 1
                             else (ref.make_batch, ref.minibatch_losses))
    global_step, start_time, outcome, recent_returns = 0, time.time(), "crashed", deque(maxlen=20)
    try:
        for iteration in range(1, num_iterations + 1):
            optimizer.param_groups[0]["lr"] = ref.learning_rate_at(args, iteration, num_iterations)
            episodes = ref.collect_rollout(games, encoder, actor, critic, rollout, env_state, env_step=step_atari)
            ref.log_episodes(writer, episodes, recent_returns, global_step, args.num_envs)
            batch = make_batch(args, rollout, encoder, target_encoder, critic)
            losses = ref.update(args, encoder, target_encoder, predictor, actor, critic, optimizer, batch, losses_fn)
            global_step += batch_size
            ref.log_update(writer, losses, batch, rollout, optimizer.param_groups[0]["lr"], global_step)
            lab.log_jepa_steps(writer, losses, args.jepa_steps, global_step)
            ref.log_progress(writer, global_step, start_time, recent_returns)
        outcome = "finished"
    except KeyboardInterrupt:
        outcome = "interrupted"
        print(f"interrupted at global step {global_step}; logs flushed to {run_dir}")
    except FloatingPointError as e:
        outcome = f"error: {e} at global step {global_step}; logs flushed to {run_dir}, no model saved"
    finally:  # as the reference: a model is saved at the end or on Ctrl-C, never after a crash or a non-finite loss
        if args.save_model and outcome in ("finished", "interrupted"):
            ref.save_checkpoint(os.path.join(run_dir, "model.pt"), args, encoder, target_encoder, predictor, actor,
                                critic)
            print(f"model saved to {os.path.join(run_dir, 'model.pt')}")
        games.close()
        writer.close()
    if outcome.startswith("error"):
        sys.exit(outcome)
