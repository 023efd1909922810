"""PPO that learns CartPole-v1 from pixels through a ViT trained with a JEPA loss: a single-file reference of Kenneweg,
Kenneweg & Hammer, "JEPA for RL" (ESANN 2025, arXiv 2504.16591). Beyond the paper: jepa_ppo_cartpole_lab.py.
    x-encoder  ViT over the patches of frames (t-2, t-1, t); its CLS output is the embedding s_x
    y-encoder  the same ViT fed frames (t-1, t, t+1); an EMA of the x-encoder, never given a gradient
    predictor  2-layer MLP: s_x and the one-hot action a_t -> prediction of s_y
    losses     PPO (actor, critic, entropy) + jepa_coef * ||pred - s_y||^2 (+ var_coef * L_var)"""

import contextlib
import functools
import io
import itertools
import math
import os
import random
import sys
import tempfile
import time
import unittest.mock
from collections import deque
from dataclasses import asdict, dataclass

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from PIL import Image
from torch.distributions.categorical import Categorical
from torch.utils.tensorboard import SummaryWriter

@dataclass
class Args:
    exp_name: str = "jepa_ppo_cartpole"
    """the name of this experiment (first part of the run directory's name)"""
    runs_dir: str = "runs"
    """the directory that holds the run directories (TensorBoard logs, saved models)"""
    seed: int = 1
    """seed of the experiment (torch, numpy, random and the environments)"""
    cuda: bool = True
    """if toggled, train on CUDA when a GPU is available (frames are then drawn on the GPU too)"""
    save_model: bool = False
    """if toggled, save encoder, y-encoder, predictor, actor and critic to `<run dir>/model.pt` at the end"""
    capture_video: bool = False
    """if toggled, play 10 greedy episodes after training, log their mean return, save the first as a GIF"""
    # The paper's three switches
    jepa: bool = True
    """add the JEPA loss to the encoder's objective"""
    rl_grad: bool = True
    """let the actor and critic losses back-propagate into the encoder (--no-rl-grad detaches s_x)"""
    var_reg: bool = False
    """add the variance loss L_var = -min(1, mean_d Var_batch(s_x)) against collapse"""
    # PPO (names and meaning as in CleanRL's ppo.py)
    total_timesteps: int = 100_000
    """total environment steps of the experiment"""
    learning_rate: float = 1e-3
    """the learning rate of the Adam optimizer"""
    num_envs: int = 8
    """the number of parallel CartPole environments"""
    num_steps: int = 32
    """the number of steps per environment per rollout"""
    anneal_lr: bool = True
    """linearly anneal the learning rate to 0 over the run"""
    lr_warmup_iters: int = 40
    """(beyond the paper) raise the learning rate linearly over this many first iterations, times the annealing"""
    gamma: float = 0.98
    """the discount factor gamma"""
    gae_lambda: float = 0.8
    """the lambda of generalized advantage estimation"""
    num_minibatches: int = 4
    """the number of minibatches per update epoch"""
    update_epochs: int = 4
    """the number of epochs over each rollout"""
    clip_coef: float = 0.2
    """the PPO surrogate clipping coefficient"""
    ent_coef: float = 0.0
    """coefficient of the entropy bonus"""
    vf_coef: float = 0.5
    """coefficient of the value loss"""
    max_grad_norm: float = 0.5
    """the maximum gradient norm, clipped for encoder, predictor, actor and critic separately"""
    # Frames, ViT, predictor and JEPA
    frame_height: int = 32
    """height of a frame in pixels (the 160-row band where cart and pole can be, scaled)"""
    frame_width: int = 96
    """width of a frame in pixels (the full 600-pixel track, scaled)"""
    patch_size: int = 16
    """side of a square ViT patch; must divide the frame height and width"""
    embed_dim: int = 64
    """width of the ViT and dimension d of the embedding s_x (the paper uses 64)"""
    depth: int = 2
    """number of transformer blocks"""
    num_heads: int = 4
    """number of attention heads; must divide --embed-dim"""
    mlp_ratio: int = 4
    """hidden width of each block's MLP, as a multiple of --embed-dim"""
    predictor_hidden: int = 128
    """hidden width of the two-layer predictor"""
    jepa_coef: float = 1.0
    """weight of the JEPA loss (the paper gives none: 1)"""
    var_coef: float = 1.0
    """weight of the variance loss when --var-reg is on"""
    ema_tau: float = 0.99
    """EMA momentum of the y-encoder: theta_y <- tau * theta_y + (1 - tau) * theta_x, after every optimizer step"""

def check_args(args: Args) -> "str | None":
    """Return a one-line error naming the offending flag, or None when the flags make sense."""
    positive = ["total_timesteps", "num_envs", "num_steps", "num_minibatches", "update_epochs", "frame_height",
                "frame_width", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "predictor_hidden",
                "learning_rate", "clip_coef", "max_grad_norm"]
    non_negative = ["ent_coef", "vf_coef", "jepa_coef", "var_coef", "lr_warmup_iters"]
    rules = [("must be positive", lambda v: v > 0, positive), ("must be non-negative", lambda v: v >= 0, non_negative),
             ("must lie in [0, 1]", lambda v: 0.0 <= v <= 1.0, ["gamma", "gae_lambda", "ema_tau"]),
             (f"must be divisible by --patch-size ({args.patch_size})", lambda v: v % args.patch_size == 0,
              ["frame_height", "frame_width"]),
             (f"must be divisible by --num-heads ({args.num_heads})", lambda v: v % args.num_heads == 0, ["embed_dim"])]
    for rule, holds, names in rules:
        for name in names:
            if not holds(getattr(args, name)):
                return f"--{name.replace('_', '-')} {rule}, got {getattr(args, name)}"
    # a reset row follows a transition, so num_steps // 2 rows per env or more are transitions; a minibatch needs 2
    most = args.num_envs * (args.num_steps // 2) // 2
    if args.num_minibatches > most:
        return (f"--num-minibatches ({args.num_minibatches}) must be at most --num-envs x (--num-steps // 2) / 2 = "
                f"{most}{' (raise --num-envs or --num-steps)' if most == 0 else ''}: a minibatch needs 2 transitions")
    if args.total_timesteps < args.num_envs * args.num_steps:
        return f"--total-timesteps must be at least --num-envs x --num-steps, got {args.total_timesteps}"
    if not (args.jepa or args.rl_grad or args.var_reg):
        return "--no-jepa --no-rl-grad --no-var-reg leaves the encoder untrained: use --jepa, --rl-grad or --var-reg"

def parse_args(argv=None, args_class=Args, check=check_args):
    """tyro's parser, with every error boiled down to one line and no run directory touched."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args = tyro.cli(args_class, args=argv)
    except SystemExit as e:  # --help exits with 0
        sys.exit(f"error: {tyro_error(args_class, argv)} (see --help)" if e.code else 0)
    if error := check(args):
        sys.exit(f"error: {error}")
    return args

def tyro_error(args_class, argv) -> str:
    """tyro's error box, drawn again too wide to wrap, as one line: its message, then the flags it suggests."""
    with contextlib.redirect_stderr(io.StringIO()) as errors, unittest.mock.patch.dict(os.environ, COLUMNS="100000"):
        with contextlib.suppress(SystemExit):
            tyro.cli(args_class, args=argv)
    # the box's rows, sides and corners stripped: a title, the message, then sections between rules ("" or "---")
    rows = [row.strip(" |\u2502\u256d\u256e\u2570\u256f\u2500") for row in errors.getvalue().splitlines()]
    rows = list(itertools.dropwhile(lambda row: not row, rows))[1:]
    message, *hints = [list(rows) for rule, rows in itertools.groupby(rows, lambda row: not row.strip("-")) if not rule]
    suggested = sorted({flag.split()[0] for hint in hints if hint[0].startswith(("Perhaps", "Arguments similar"))
                        for row in hint[1:] if row.startswith("--") for flag in row.split(", ")})
    return " ".join(message) + (f"; perhaps you meant {', '.join(suggested)}" if suggested else "")

# -- Pixels: Gymnasium's CartPole scene drawn in torch ----------------------------------------------------------------
# Geometry of gymnasium/envs/classic_control/cartpole.py `render`, in the 600 x 400 frame after its vertical flip (y
# down). pygame truncates coordinates and fills the pixels whose corner is inside a shape: [trunc(a), trunc(b) + 1).
SCREEN_WIDTH, SCALE = 600, 600 / (2 * 2.4)  # 125 pixels per metre
CROP_TOP, CROP_BOTTOM = 165, 325  # the rows where cart and pole can ever be (non-white rows: 172-314)
CART_TOP, CART_BOTTOM, TRACK_ROW = 284.0, 315.0, 299.0
PIVOT_Y, AXLE_RADIUS = 292.5, 5.5  # pole axle, 107.5 above the bottom in Gymnasium's own (unflipped) coordinates
# grayscale shades (ITU-R 601 luma) of Gymnasium's pole and axle colours
POLE_GRAY, AXLE_GRAY = (0.299 * r + 0.587 * g + 0.114 * b for r, g, b in [(202, 152, 101), (129, 132, 203)])

def interval_coverage(lo, hi, pixel_lo, pixel_hi):
    """Fraction of each pixel interval [pixel_lo, pixel_hi) covered by [lo, hi) (broadcasts)."""
    return (torch.minimum(hi, pixel_hi) - torch.maximum(lo, pixel_lo)).clamp(min=0) / (pixel_hi - pixel_lo)

@functools.lru_cache(maxsize=8)
def pixel_grid(height: int, width: int, device: torch.device) -> dict:
    """What `render_cartpole` needs about the output pixels that no state changes: computed once per size."""
    sx, sy = SCREEN_WIDTH / width, (CROP_BOTTOM - CROP_TOP) / height  # source pixels per output pixel
    left = torch.arange(width, device=device, dtype=torch.float32) * sx  # (W,) pixel edges
    top = CROP_TOP + torch.arange(height, device=device, dtype=torch.float32) * sy  # (H,)
    row_coverage = lambda lo, hi: interval_coverage(top.new_tensor(lo), top.new_tensor(hi), top, top + sy)
    axle_rows = slice(int((PIVOT_Y - AXLE_RADIUS - CROP_TOP) // sy), math.ceil((PIVOT_Y + AXLE_RADIUS - CROP_TOP) / sy))
    return {
        "sx": sx, "sy": sy, "left": left, "right": left + sx,
        "centre_x": left + sx / 2, "centre_y": (top + sy / 2)[:, None],  # (W,) and (H, 1)
        "cart_rows": 255.0 * row_coverage(CART_TOP, CART_BOTTOM)[:, None],  # (H, 1), times the cart's darkness
        "track_keep": 1.0 - row_coverage(TRACK_ROW, TRACK_ROW + 1)[:, None],  # (H, 1)
        # the axle stays on the few rows around the pivot: it is drawn on those alone
        "axle_rows": axle_rows, "axle_top": top[axle_rows, None, None], "axle_bottom": top[axle_rows, None, None] + sy,
        "axle_sub_x": left[:, None] + (torch.arange(4, device=device) + 0.5) * (sx / 4),  # (W, 4) sub-column centres
        # the pole's corners in its own frame (+-5 across its axis, -5..120 along it), clockwise on screen
        "pole_across": torch.tensor([-5.0, -5.0, 5.0, 5.0], device=device),
        "pole_along": torch.tensor([-5.0, 120.0, 120.0, -5.0], device=device)}

def render_cartpole(states: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """States (N, 4) -> grayscale frames (N, height, width) uint8, each pixel the area average of Gymnasium's frame
    (rows 165-325) over it: exact for cart and track, close for the pole (4 edge ramps) and axle (4 sub-columns)."""
    grid = pixel_grid(height, width, states.device)
    cart_x = states[:, 0:1].float() * SCALE + SCREEN_WIDTH / 2  # (N, 1) cart centre in pixels
    theta = states[:, 2:3].float()
    # Cart on white: its columns are exact coverages of [trunc(x - 25), trunc(x + 25) + 1), its rows fixed.
    cart_cols = interval_coverage(torch.trunc(cart_x - 25), torch.trunc(cart_x + 25) + 1, grid["left"], grid["right"])
    gray = 255.0 - grid["cart_rows"] * cart_cols[:, None, :]  # (N, H, W)
    # Pole: Gymnasium's corners rotated by -theta about (cart_x, 107.5) and truncated like pygame. Each edge
    # contributes a linear coverage ramp one footprint wide, a plane a x + b y + c in the pixel centre;
    # the pole's coverage is the product of its 4 clamped ramps.
    sin, cos, across, along = torch.sin(theta), torch.cos(theta), grid["pole_across"], grid["pole_along"]
    corner_x = torch.trunc(across * cos + along * sin + cart_x) + 0.5  # (N, 4) pixel centres
    corner_y = 399.5 - torch.trunc(along * cos - across * sin + 107.5)
    edge_x, edge_y = corner_x.roll(-1, 1) - corner_x, corner_y.roll(-1, 1) - corner_y  # edge k: corner k -> k + 1
    length = torch.hypot(edge_x, edge_y)
    normal_x, normal_y = -edge_y / length, edge_x / length  # (N, 4), pointing into the pole
    footprint = normal_x.abs() * grid["sx"] + normal_y.abs() * grid["sy"]
    # ramp = 0.5 + (signed distance + 0.5) / footprint; the +0.5 inside: pygame fills edge pixels inclusively
    a, b = (normal_x / footprint)[..., None, None], (normal_y / footprint)[..., None, None]  # (N, 4, 1, 1)
    c = ((0.5 - corner_x * normal_x - corner_y * normal_y) / footprint + 0.5)[..., None, None]
    ramps = (a * grid["centre_x"]) + (b * grid["centre_y"] + c)  # (N, 4, 1, W) + (N, 4, H, 1) -> (N, 4, H, W)
    cover = ramps.clamp_(0, 1).prod(dim=1)  # (N, H, W)
    # Axle: a disc at the truncated cart centre; exact coverage of each row, averaged over 4 sub-columns.
    rows = grid["axle_rows"]
    half_chord = (AXLE_RADIUS**2 - (grid["axle_sub_x"] - torch.trunc(cart_x)[:, :, None] - 0.5) ** 2).clamp(0).sqrt()
    axle = interval_coverage((PIVOT_Y - half_chord)[:, None], (PIVOT_Y + half_chord)[:, None],
                             grid["axle_top"], grid["axle_bottom"]).mean(-1)  # (N, axle rows, W)
    cover[:, rows] = torch.maximum(cover[:, rows], axle)  # the axle lies on the pole
    # Paint in Gymnasium's order: pole and axle over the cart, then the black track line.
    gray = gray.addcmul_(cover, POLE_GRAY - gray)  # gray + cover * (POLE_GRAY - gray)
    gray[:, rows] += (AXLE_GRAY - POLE_GRAY) * axle
    gray *= grid["track_keep"]
    return gray.round_().to(torch.uint8)  # convex mixtures of shades in [0, 255]: no clamp needed

def make_envs(num_envs: int):
    """Gymnasium's numpy CartPole-v1, vectorized; NEXT_STEP autoreset; episode statistics in info."""
    envs = gym.make_vec("CartPole-v1", num_envs=num_envs, vectorization_mode="vector_entry_point")
    return gym.wrappers.vector.RecordEpisodeStatistics(envs)

def initial_stack(states: torch.Tensor, height: int, width: int, length: int = 3) -> torch.Tensor:
    """(N, 4) first states of episodes -> (N, length, H, W): the missing earlier frames repeat the first."""
    return render_cartpole(states, height, width)[:, None].repeat(1, length, 1, 1)

def push_frame(stack: torch.Tensor, frame: torch.Tensor, episode_start: torch.Tensor) -> torch.Tensor:
    """(N, L, H, W) frames (t-L+1, ..., t) -> (t-L+2, ..., t+1); a new episode repeats its first frame."""
    shifted = torch.cat([stack[:, 1:], frame[:, None]], dim=1)
    return torch.where(episode_start[:, None, None, None], frame[:, None].expand_as(stack), shifted)

def step_envs(envs, action, stack, is_reset_step):
    """One vector step -> (state, reward, terminated, done, next stack, info), tensors. NEXT_STEP autoreset makes the
    step after a done (`is_reset_step`) a reset, no transition, whose first state fills the whole stack."""
    state, reward, terminated, truncated, info = envs.step(action.cpu().numpy())
    tensor = lambda array, dtype=None: torch.as_tensor(array, dtype=dtype, device=stack.device)
    state, done = tensor(state), tensor(terminated | truncated)
    next_stack = push_frame(stack, render_cartpole(state, stack.shape[2], stack.shape[3]), is_reset_step)
    return state, tensor(reward, torch.float32), tensor(terminated, torch.float32), done, next_stack, info

# -- Networks ---------------------------------------------------------------------------------------------------------
def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer

class Block(nn.Module):  # pre-norm transformer block with fused attention
    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.num_heads = num_heads
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))
    def forward(self, x):  # (B, T, D)
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, D / heads)
        x = x + self.proj(attended.transpose(1, 2).reshape(B, T, D))
        return x + self.mlp(self.ln_2(x))

class ViTEncoder(nn.Module):
    """Frames (B, F, H, W) uint8 -> embedding (B, D): the CLS token after the last block and a final LayerNorm. Each
    frame's patches are tokens of their own, at a position that sums three learned tables: frame, row, column."""
    def __init__(self, frame_height=32, frame_width=96, patch_size=16, embed_dim=64, depth=2, num_heads=4, mlp_ratio=4,
                 num_frames=3):
        super().__init__()
        if frame_height % patch_size or frame_width % patch_size or embed_dim % num_heads:
            raise ValueError(f"patch_size ({patch_size}) must divide frame_height ({frame_height}) and frame_width "
                             f"({frame_width}), num_heads ({num_heads}) must divide embed_dim ({embed_dim})")
        p, d = patch_size, embed_dim
        self.patch_size, self.rows, self.cols, self.num_frames = p, frame_height // p, frame_width // p, num_frames
        self.patch_proj = nn.Linear(p * p, d)
        self.frame_pos = nn.Parameter(0.02 * torch.randn(num_frames, 1, 1, d))
        self.row_pos = nn.Parameter(0.02 * torch.randn(1, self.rows, 1, d))
        self.col_pos = nn.Parameter(0.02 * torch.randn(1, 1, self.cols, d))
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, d))
        self.blocks = nn.ModuleList(Block(d, num_heads, mlp_ratio) for _ in range(depth))
        self.ln_f = nn.LayerNorm(d)
    def embed_patches(self, frames):
        """(B, F, H, W) uint8 -> tokens (B, F, rows, cols, D). uint8 is rearranged (a cheap copy), then made floats as
        ink (1 - intensity): the white background is 0, so only patches with cart or pole stand out from the bias."""
        (B, *size), p, n = frames.shape, self.patch_size, self.num_frames
        if frames.dtype != torch.uint8 or size != [n, self.rows * p, self.cols * p]:
            raise ValueError(f"ViTEncoder takes uint8 frames (B, {n}, {self.rows * p}, {self.cols * p}), got "
                             f"{frames.dtype} {tuple(frames.shape)}")
        patches = frames.view(B, n, self.rows, p, self.cols, p).permute(0, 1, 2, 4, 3, 5)  # (B, F, rows, cols, p, p)
        return self.patch_proj(torch.rsub(patches.reshape(B, n, self.rows, self.cols, p * p), 1.0, alpha=1 / 255))
    def pre_norm(self, frames):
        """(B, F, H, W) uint8 -> (B, D): the CLS token after the last block, before the final LayerNorm."""
        B = frames.shape[0]
        tokens = self.embed_patches(frames) + self.frame_pos + self.row_pos + self.col_pos  # (B, F, rows, cols, D)
        x = torch.cat([self.cls_token.expand(B, -1, -1), tokens.flatten(1, 3)], dim=1)  # (B, 1 + F rows cols, D)
        for block in self.blocks:
            x = block(x)
        return x[:, 0]
    def forward(self, frames):
        return self.ln_f(self.pre_norm(frames))

class Predictor(nn.Module):
    """Two-layer MLP: s_x (B, D) and action (B,) -> predicted s_y (B, D)."""
    def __init__(self, embed_dim=64, hidden=128, num_actions=2):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(embed_dim, hidden), nn.Linear(hidden, embed_dim)
        self.action_proj = nn.Linear(num_actions, hidden)  # the one-hot action, added before the non-linearity
    def forward(self, s_x, action):
        if action.shape != s_x.shape[:1] or action.is_floating_point() or action.is_complex():
            raise ValueError(f"Predictor takes one integer action per row, got {action.dtype} {tuple(action.shape)}")
        one_hot = F.one_hot(action.long(), self.action_proj.in_features).float()  # (B, num_actions)
        return self.fc2(F.gelu(self.fc1(s_x) + self.action_proj(one_hot)))

def make_heads(embed_dim, num_actions=2):
    """Actor and critic: small MLPs that see only the embedding."""
    actor = nn.Sequential(layer_init(nn.Linear(embed_dim, 64)), nn.Tanh(), layer_init(nn.Linear(64, num_actions), 0.01))
    critic = nn.Sequential(layer_init(nn.Linear(embed_dim, 64)), nn.Tanh(), layer_init(nn.Linear(64, 1), std=1.0))
    return actor, critic

def make_vit(args: Args) -> ViTEncoder:
    return ViTEncoder(args.frame_height, args.frame_width, args.patch_size, args.embed_dim, args.depth, args.num_heads,
                      args.mlp_ratio)

def make_agent(args: Args, device, encoder_fn=make_vit, num_actions=2):
    """x-encoder, y-encoder (an exact copy, never optimized; `encoder_fn` builds both), predictor, actor, critic, and
    one Adam over all that is trained: elementwise, the modules share it without sharing a step (`clip_grad_norms`)."""
    encoder = encoder_fn(args).to(device)
    target_encoder = encoder_fn(args).to(device)
    target_encoder.load_state_dict(encoder.state_dict())
    target_encoder.requires_grad_(False)
    predictor = Predictor(args.embed_dim, args.predictor_hidden, num_actions).to(device)
    actor, critic = (head.to(device) for head in make_heads(args.embed_dim, num_actions))
    trained = [p for module in (encoder, predictor, actor, critic) for p in module.parameters()]
    optimizer = torch.optim.Adam(trained, lr=args.learning_rate, eps=1e-5, fused=True)  # fused: one kernel for all
    return encoder, target_encoder, predictor, actor, critic, optimizer

@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, tau: float):
    """theta_target <- tau * theta_target + (1 - tau) * theta_online."""
    for p_target, p_online in zip(target.parameters(), online.parameters()):
        p_target.lerp_(p_online, 1.0 - tau)

# -- Losses and collapse indicators -----------------------------------------------------------------------------------
def jepa_loss(prediction, target):
    """Squared Euclidean distance between prediction and y-embedding, averaged over the batch."""
    return (prediction - target).pow(2).sum(-1).mean()

def embedding_variance(s):
    """The paper's collapse indicator: batch-wise variance of each dimension, averaged over dimensions."""
    return s.var(dim=0).mean()

def variance_loss(s_x):
    """L_var = -min(1, mean_d Var_batch(s_x)): rewards spread up to unit variance, then stops."""
    if s_x.shape[0] < 2:
        raise ValueError(f"variance_loss needs a batch of 2 or more embeddings (B, D), got {tuple(s_x.shape)}")
    return -s_x.var(dim=0).mean().clamp(max=1.0)  # embedding_variance, written out so that this copies alone

def compute_advantages(rewards, values, next_value, terminations, dones, gamma, gae_lambda):
    """GAE over (num_steps, num_envs). The row after a done holds the episode's final state (NEXT_STEP autoreset): a
    truncation bootstraps from its value, a termination does not; the done keeps the reset row's advantage out."""
    advantages, lastgaelam = torch.zeros_like(rewards), torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[0])):
        nextvalues = next_value if t == rewards.shape[0] - 1 else values[t + 1]
        delta = rewards[t] + gamma * nextvalues * (1.0 - terminations[t]) - values[t]
        advantages[t] = lastgaelam = delta + gamma * gae_lambda * (1.0 - dones[t]) * lastgaelam
    return advantages

def minibatch_losses(args: Args, encoder, predictor, actor, critic, mb: dict) -> dict:
    """PPO's clipped losses plus the JEPA and variance losses on one minibatch; "loss" is their weighted sum."""
    s_x = encoder(mb["stacks"])
    s_rl = s_x if args.rl_grad else s_x.detach()  # --no-rl-grad: PPO never reaches the encoder
    probs = Categorical(logits=actor(s_rl), validate_args=False)
    newlogprob, entropy = probs.log_prob(mb["actions"]), probs.entropy().mean()
    newvalue = critic(s_rl).flatten()
    logratio = newlogprob - mb["logprobs"]
    ratio = logratio.exp()
    advantages = (mb["advantages"] - mb["advantages"].mean()) / (mb["advantages"].std() + 1e-8)  # per minibatch
    clipped_ratio = torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)
    pg_loss = torch.max(-advantages * ratio, -advantages * clipped_ratio).mean()
    v_clipped = mb["values"] + torch.clamp(newvalue - mb["values"], -args.clip_coef, args.clip_coef)
    v_loss = 0.5 * torch.max((newvalue - mb["returns"]) ** 2, (v_clipped - mb["returns"]) ** 2).mean()  # clipped
    # --no-jepa: the predictor still trains, on detached s_x, so losses/jepa_loss stays comparable across configurations
    prediction = predictor(s_x if args.jepa else s_x.detach(), mb["actions"])
    j_loss = jepa_loss(prediction, mb["targets"])
    var_loss = variance_loss(s_x)
    loss = pg_loss - args.ent_coef * entropy + args.vf_coef * v_loss + args.jepa_coef * j_loss
    if args.var_reg:
        loss = loss + args.var_coef * var_loss
    with torch.no_grad():
        approx_kl = ((ratio - 1) - logratio).mean()
        clipfrac = ((ratio - 1.0).abs() > args.clip_coef).float().mean()
    return {"loss": loss, "policy_loss": pg_loss, "value_loss": v_loss, "entropy": entropy, "jepa_loss": j_loss,
            "var_loss": var_loss, "approx_kl": approx_kl, "clipfrac": clipfrac}

# -- Rollout, batch and update: the three steps of one training iteration ---------------------------------------------
def make_rollout_storage(num_steps, num_envs, stack_shape, embed_dim, device) -> dict:
    """Row t: the stack seen at step t and what followed; `stacks` has one row more: the y-encoder's input for row t."""
    T, N = num_steps, num_envs
    zeros = lambda *shape, dtype=torch.float32: torch.zeros(shape, dtype=dtype, device=device)
    return {"stacks": zeros(T + 1, N, *stack_shape, dtype=torch.uint8),  # stack_shape: (3, H, W)
            "valid": zeros(T, N, dtype=torch.bool),  # False on the reset steps of NEXT_STEP autoreset: no transition
            "actions": zeros(T, N, dtype=torch.long), "logprobs": zeros(T, N), "values": zeros(T, N),
            "rewards": zeros(T, N), "terminations": zeros(T, N), "dones": zeros(T, N),  # done: row t + 1 resets
            "embeddings": zeros(T, N, embed_dim), "pre_norm": zeros(T, N, embed_dim)}  # s_x, and before the final LN

def collect_rollout(envs, encoder, actor, critic, rollout: dict, env_state: dict, env_step=step_envs) -> list:
    """Play one rollout into `rollout` (in place); return the ended episodes as (row, return, length). `env_state`
    carries state, frame stack and reset-step flags to the next rollout. Row t's reward and done are its action's;
    `env_step` is `step_envs` or another environment's step with its signature."""
    episodes = []
    for step in range(rollout["actions"].shape[0]):
        stack = env_state["stack"]
        rollout["stacks"][step], rollout["valid"][step] = stack, ~env_state["is_reset_step"]
        with torch.no_grad():
            h = encoder.pre_norm(stack)
            s_x = encoder.ln_f(h)
            probs = Categorical(logits=actor(s_x), validate_args=False)
            action = probs.sample()
            rollout["values"][step] = critic(s_x).flatten()
        rollout["embeddings"][step], rollout["pre_norm"][step] = s_x, h
        rollout["actions"][step], rollout["logprobs"][step] = action, probs.log_prob(action)
        state, reward, terminated, done, next_stack, info = env_step(envs, action, stack, env_state["is_reset_step"])
        rollout["rewards"][step], rollout["terminations"][step], rollout["dones"][step] = reward, terminated, done
        env_state.update(state=state, stack=next_stack, is_reset_step=done)
        episodes += [(step, float(info["episode"]["r"][i]), int(info["episode"]["l"][i]))
                     for i in np.flatnonzero(info.get("_episode", []))]
    rollout["stacks"][-1] = env_state["stack"]
    return episodes

def make_batch(args: Args, rollout: dict, encoder, target_encoder, critic) -> dict:
    """One rollout -> the flat batch of its transitions (reset rows dropped) with advantages, returns and JEPA
    targets: row t's is the y-encoder's embedding of row t + 1's stack, frames (t-1, t, t+1), once per rollout."""
    stacks, values = rollout["stacks"], rollout["values"]  # (T + 1, N, 3, H, W), (T, N)
    with torch.no_grad():
        next_value = critic(encoder(stacks[-1])).flatten()
        advantages = compute_advantages(rollout["rewards"], values, next_value, rollout["terminations"],
                                        rollout["dones"], args.gamma, args.gae_lambda)
        batch = {"stacks": stacks[:-1], "next_stacks": stacks[1:], "actions": rollout["actions"], "values": values,
                 "logprobs": rollout["logprobs"], "advantages": advantages, "returns": advantages + values}
        batch = {k: v.flatten(0, 1) for k, v in batch.items()}
        batch["targets"] = target_encoder(batch.pop("next_stacks"))  # (T * N, D)
    return {k: v[rollout["valid"].flatten()] for k, v in batch.items()}  # the reset rows dropped

def clip_grad_norms(modules: dict, max_norm: float) -> dict:
    """Clip each module's gradient by its own norm, so no loss rescales the step of a module it does not reach (the
    predictor of --no-jepa, the critic of --no-rl-grad); return the norms before. `clip_grad_norm_`'s arithmetic."""
    norms = {}
    for name, module in modules.items():
        grads = [p.grad for p in module.parameters() if p.grad is not None] or [torch.zeros(())]  # none: norm 0
        norms[name] = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        torch._foreach_mul_(grads, (max_norm / (norms[name] + 1e-6)).clamp(max=1.0))
    return norms

def update(args: Args, encoder, target_encoder, predictor, actor, critic, optimizer, batch, losses_fn=minibatch_losses):
    """PPO's epochs over a batch, the minibatch losses of `losses_fn` (PPO, JEPA, variance), the EMA after each step."""
    modules = {"encoder": encoder, "predictor": predictor, "actor": actor, "critic": critic}
    num_valid, clipfracs = len(batch["actions"]), []
    for epoch in range(args.update_epochs):
        for mb_inds in torch.randperm(num_valid, device=batch["actions"].device).tensor_split(args.num_minibatches):
            mb = {k: v[mb_inds] for k, v in batch.items()}
            losses = losses_fn(args, encoder, predictor, actor, critic, mb)
            clipfracs.append(losses["clipfrac"].item())
            if not torch.isfinite(losses["loss"]):
                raise FloatingPointError(f"non-finite loss ({losses['loss'].item()})")
            optimizer.zero_grad()
            losses["loss"].backward()
            grad_norms = clip_grad_norms(modules, args.max_grad_norm)
            optimizer.step()
            ema_update(target_encoder, encoder, args.ema_tau)
    return {**losses, "clipfrac": float(np.mean(clipfracs)), **{f"grad_norm_{k}": v for k, v in grad_norms.items()}}

# -- The training loop's bookkeeping: learning rate, logs, run directory, checkpoint, greedy play ---------------------
def learning_rate_at(args: Args, iteration: int, num_iterations: int) -> float:
    """Linear annealing to 0, times a warm-up: Adam's first steps move each weight by about lr whatever its gradient."""
    frac = 1.0 - (iteration - 1.0) / num_iterations if args.anneal_lr else 1.0
    warmup = min(1.0, iteration / args.lr_warmup_iters) if args.lr_warmup_iters else 1.0
    return frac * warmup * args.learning_rate

def log_update(writer, losses: dict, batch: dict, rollout: dict, learning_rate: float, global_step: int):
    """CleanRL's tags, gradient norms, and the collapse indicators on the rollout's own embeddings."""
    valid = rollout["valid"]
    variance = embedding_variance(rollout["embeddings"][valid]).item()  # on the rollout's transitions
    y_pred, y_true = batch["values"].cpu().numpy(), batch["returns"].cpu().numpy()
    explained_var = np.nan if np.var(y_true) == 0 else 1 - np.var(y_true - y_pred) / np.var(y_true)
    losses = {k: v.item() if torch.is_tensor(v) else v for k, v in losses.items()}
    scalars = {"charts/learning_rate": learning_rate,
               **{f"losses/{k}": losses[k] for k in ["value_loss", "policy_loss", "entropy", "approx_kl", "clipfrac",
                                                     "jepa_loss", "var_loss"]},
               "losses/explained_variance": explained_var,
               **{f"grad_norm/{k}": losses[f"grad_norm_{k}"] for k in ["encoder", "predictor", "actor", "critic"]},
               "embedding/variance": variance, "embedding/collapsed": float(variance < 1e-7),
               "embedding/variance_pre_ln": embedding_variance(rollout["pre_norm"][valid]).item()}
    for tag, value in scalars.items():
        writer.add_scalar(tag, value, global_step)

def log_episodes(writer, episodes: list, recent_returns: deque, global_step: int, num_envs: int):
    """Each ended episode at the step it ended (`global_step` is the step before the rollout)."""
    for row, episodic_return, episodic_length in episodes:
        recent_returns.append(episodic_return)
        writer.add_scalar("charts/episodic_return", episodic_return, global_step + (row + 1) * num_envs)
        writer.add_scalar("charts/episodic_length", episodic_length, global_step + (row + 1) * num_envs)

def log_progress(writer, global_step: int, start_time: float, recent_returns: deque):
    sps = int(global_step / (time.time() - start_time))
    writer.add_scalar("charts/SPS", sps, global_step)
    print(f"step {global_step:7d} | return {np.mean(recent_returns or [np.nan]):6.1f} | SPS {sps:5d}", flush=True)

def make_run_dir(args: Args) -> str:
    """<runs_dir>/<exp>__<configuration>__s<seed>__<unix time>_<suffix>, made atomically: never shared by two runs."""
    configuration = "-".join(name if on else "no" + name for name, on in
                             [("jepa", args.jepa), ("rlgrad", args.rl_grad), ("var", args.var_reg)])
    os.makedirs(args.runs_dir, exist_ok=True)
    return tempfile.mkdtemp(prefix=f"{args.exp_name}__{configuration}__s{args.seed}__{int(time.time())}_",
                            dir=args.runs_dir)

def save_checkpoint(path: str, args, encoder, target_encoder, predictor, actor, critic):
    modules = dict(encoder=encoder, target_encoder=target_encoder, predictor=predictor, actor=actor, critic=critic)
    torch.save({"args": asdict(args), **{name: module.state_dict() for name, module in modules.items()}}, path)

@torch.no_grad()
def play_greedy(encoder, actor, height, width, episodes, seed, gif_path=None, stack_length=3) -> float:
    """The mean return of greedy episodes, one per environment; the first saved to `gif_path` at 160 x 600."""
    device, envs = next(encoder.parameters()).device, make_envs(episodes)
    state = torch.as_tensor(envs.reset(seed=seed)[0], device=device)
    stack = initial_stack(state, height, width, stack_length)
    is_reset_step = torch.zeros(episodes, dtype=torch.bool, device=device)
    draw = lambda state: render_cartpole(state[:1], CROP_BOTTOM - CROP_TOP, SCREEN_WIDTH)[0].cpu().numpy()
    returns, finished, gif_frames = np.zeros(episodes), np.zeros(episodes, bool), [draw(state)] if gif_path else []
    while not finished.all():
        action = actor(encoder(stack)).argmax(-1)
        state, _, _, is_reset_step, stack, info = step_envs(envs, action, stack, is_reset_step)
        if gif_path and not finished[0]:  # NEXT_STEP autoreset: the step that ends an episode returns its last state
            gif_frames.append(draw(state))
        if "_episode" in info:
            newly = info["_episode"] & ~finished
            returns[newly] = info["episode"]["r"][newly]
            finished |= info["_episode"]
    envs.close()
    if gif_path:  # CartPole moves 0.02 s per step: 20 ms a frame is real time
        first, *rest = [Image.fromarray(frame) for frame in gif_frames]
        first.save(gif_path, save_all=True, append_images=rest, duration=20, loop=0)
    return float(returns.mean())

def start_run(args: Args, device, make_envs=make_envs):
    """Seeds; the run directory, its writer with every flag's value; the environments and their first state."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = True  # on a GPU too, a seed gives one run
    run_dir = make_run_dir(args)
    writer = SummaryWriter(run_dir)
    table = "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
    envs = make_envs(args.num_envs)
    return run_dir, writer, envs, torch.as_tensor(envs.reset(seed=args.seed)[0], device=device)

if __name__ == "__main__":
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    run_dir, writer, envs, first_state = start_run(args, device)
    encoder, target_encoder, predictor, actor, critic, optimizer = make_agent(args, device)
    H, W, batch_size = args.frame_height, args.frame_width, args.num_envs * args.num_steps
    num_iterations = args.total_timesteps // batch_size
    rollout = make_rollout_storage(args.num_steps, args.num_envs, (3, H, W), args.embed_dim, device)
    env_state = {"state": first_state, "stack": initial_stack(first_state, H, W),
                 "is_reset_step": torch.zeros(args.num_envs, dtype=torch.bool, device=device)}
    global_step, start_time, outcome, recent_returns = 0, time.time(), "crashed", deque(maxlen=20)
    try:
        for iteration in range(1, num_iterations + 1):
            optimizer.param_groups[0]["lr"] = learning_rate_at(args, iteration, num_iterations)
            episodes = collect_rollout(envs, encoder, actor, critic, rollout, env_state)
            log_episodes(writer, episodes, recent_returns, global_step, args.num_envs)
            batch = make_batch(args, rollout, encoder, target_encoder, critic)
            losses = update(args, encoder, target_encoder, predictor, actor, critic, optimizer, batch)
            global_step += batch_size
            log_update(writer, losses, batch, rollout, optimizer.param_groups[0]["lr"], global_step)
            log_progress(writer, global_step, start_time, recent_returns)
        if args.capture_video:
            gif_path = os.path.join(run_dir, "greedy_episode.gif")
            greedy_return = play_greedy(encoder, actor, H, W, 10, args.seed, gif_path)
            writer.add_scalar("charts/greedy_return", greedy_return, global_step)
            print(f"mean return over 10 greedy episodes: {greedy_return:.1f}; first saved to {gif_path}")
        outcome = "finished"
    except KeyboardInterrupt:
        outcome = "interrupted"
        print(f"interrupted at global step {global_step}; logs flushed to {run_dir}")
    except FloatingPointError as e:
        outcome = f"error: {e} at global step {global_step}; logs flushed to {run_dir}, no model saved"
    finally:  # a model is saved at the end or on Ctrl-C, never after a crash or a non-finite loss
        if args.save_model and outcome in ("finished", "interrupted"):
            save_checkpoint(os.path.join(run_dir, "model.pt"), args, encoder, target_encoder, predictor, actor, critic)
            print(f"model saved to {os.path.join(run_dir, 'model.pt')}")
        envs.close()
        writer.close()
    if outcome.startswith("error"):
        sys.exit(outcome)
