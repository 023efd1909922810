"""JEPA for RL: PPO that learns CartPole-v1 from pixels through a ViT trained with a JEPA loss.

A single-file reference implementation of Kenneweg, Kenneweg & Hammer, "JEPA for RL: Investigating
Joint-Embedding Predictive Architectures for Reinforcement Learning" (ESANN 2025, arXiv 2504.16591).

    x-encoder  ViT over the patches of frames (t-2, t-1, t); its CLS output is the embedding s_x
    y-encoder  the same ViT fed frames (t-1, t, t+1); an EMA of the x-encoder, never given a gradient
    predictor  2-layer MLP: s_x and the one-hot action a_t -> prediction of s_y
    losses     PPO (actor, critic, entropy) + jepa_coef * ||pred - s_y||^2 (+ var_coef * L_var)

The paper's four configurations are three switches: --jepa/--no-jepa, --rl-grad/--no-rl-grad,
--var-reg/--no-var-reg. The dynamics are Gymnasium's own CartPoleVectorEnv; the agent never sees the
state vector, only frames drawn from it by `render_cartpole`, a torch drawing of Gymnasium's scene.
"""

import contextlib
import functools
import io
import itertools
import math
import os
import random
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.distributions.categorical import Categorical
from PIL import Image
from torch.utils.tensorboard import SummaryWriter


@dataclass
class Args:
    exp_name: str = "jepa_ppo_cartpole"
    """the name of this experiment (first part of the run directory's name)"""
    runs_dir: str = "runs"
    """the directory that holds the run directories (TensorBoard logs, saved models)"""
    seed: int = 1
    """seed of the experiment (torch, numpy, random and the environments)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True` (CPU runs are deterministic for a fixed thread count)"""
    cuda: bool = True
    """if toggled, train on CUDA when a GPU is available (frames are then drawn on the GPU too)"""
    save_model: bool = False
    """if toggled, save encoder, predictor, actor and critic to `runs/<run name>/model.pt` at the end"""
    eval_checkpoint: Optional[str] = None
    """if set, do not train: load this `model.pt`, play --eval-episodes greedy episodes, print their mean return"""
    eval_episodes: int = 10
    """number of greedy episodes played by --eval-checkpoint and --capture-video"""
    capture_video: bool = False
    """if toggled, play --eval-episodes greedy episodes at the end of training (or of the --eval-checkpoint model) and
    save the first as an animated GIF in the run directory (beside the checkpoint)"""

    # Configuration: the paper's three switches
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
    """(beyond the paper) raise the learning rate linearly over this many first iterations, times the annealing; 0: none"""
    gamma: float = 0.98
    """the discount factor gamma"""
    gae_lambda: float = 0.8
    """the lambda of generalized advantage estimation"""
    num_minibatches: int = 4
    """the number of minibatches per update epoch"""
    update_epochs: int = 4
    """the number of epochs over each rollout"""
    norm_adv: bool = True
    """normalize advantages within each minibatch"""
    clip_coef: float = 0.2
    """the PPO surrogate clipping coefficient"""
    clip_vloss: bool = True
    """use a clipped loss for the value function, as in the PPO paper"""
    ent_coef: float = 0.0
    """coefficient of the entropy bonus"""
    vf_coef: float = 0.5
    """coefficient of the value loss"""
    max_grad_norm: float = 0.5
    """the maximum gradient norm, clipped for encoder, predictor, actor and critic separately"""
    target_kl: Optional[float] = None
    """stop the update epochs early when the approximate KL exceeds this (the JEPA updates stop with them)"""

    # Observation
    frame_height: int = 32
    """height of a frame in pixels (the 160-row band where cart and pole can be, scaled)"""
    frame_width: int = 96
    """width of a frame in pixels (the full 600-pixel track, scaled)"""
    patch_size: int = 16
    """side of a square ViT patch; must divide the frame height and width"""
    patch_embed: Literal["linear", "conv"] = "linear"
    """how the ViT turns patches into tokens: the paper's linear projection of each patch, or (beyond the paper) a
    small convolutional stem after Xiao et al. 2021 (without their BatchNorm): log2(--patch-size) 3x3 stride-2
    convolutions with ReLU, then a 1x1 convolution to --embed-dim. Its tokens lie on the same grid with the same
    positions, but each sees a window around its patch's corner that overlaps its neighbours' (31 x 31 pixels at 16)"""
    frame_diffs: bool = False
    """if toggled (beyond the paper), the encoder reads frames t-2 and t-1 as the differences t-1 - (t-2) and
    t - (t-1), frame t as it is: the same information, but each per-frame token then holds its patch's motion.
    Where the first layer sees all three frames (--tubelets, --encoder cnn) it only reparametrises that layer"""
    frame_gap: int = 1
    """(beyond the paper) steps between the three frames: the x-encoder reads frames (t-2g, t-g, t), the y-encoder
    (t+1-2g, t+1-g, t+1); 1 is the paper's last three frames. A wider gap shows a larger motion between them; from
    2 on, x and y share no frame. The probe set plays 2g steps, so its R^2 values compare only at one gap"""
    tubelets: bool = False
    """if toggled, one token per patch position spanning all three frames (V-JEPA-style tubelets: 12 tokens +
    CLS instead of the paper's 36 + CLS, where each frame's patches are tokens with a frame-index position)"""

    # Encoder and predictor
    encoder: Literal["vit", "cnn"] = "vit"
    """the x- and y-encoder: the paper's ViT, or (a baseline beyond the paper) a small CNN that reads the three frames
    as channels (convolutions 32x4x4 stride 2, 64x3x3 stride 2, 64x3x3 stride 1, ReLU; a linear layer to
    --embed-dim; the same final LayerNorm). The ViT flags below do not apply to the CNN"""
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

    # JEPA
    jepa_coef: float = 1.0
    """weight of the JEPA loss (the paper gives none: 1)"""
    var_coef: float = 1.0
    """weight of the variance loss when --var-reg is on"""
    ema_tau: float = 0.99
    """EMA momentum of the y-encoder: theta_y <- tau * theta_y + (1 - tau) * theta_x, after every optimizer step"""
    ema_per_iteration: bool = False
    """if toggled, move the y-encoder once per iteration (after its last optimizer step) instead of after every step"""
    fresh_targets: bool = False
    """if toggled, the y-encoder embeds each minibatch's targets just before its optimizer step; by default it embeds
    the whole rollout's targets once, before the update epochs, so the last minibatch's targets come from a
    y-encoder update_epochs * num_minibatches - 1 EMA steps older than the current one"""

    # Ingredients of configuration 3's collapse (README: "Configuration 3 and the collapse")
    ink: bool = True
    """feed the ViT ink (1 - intensity, the white background is 0); --no-ink feeds raw intensities (background 1)"""
    final_ln: bool = True
    """normalize the CLS output with a LayerNorm (learnable gain and bias) to give the embedding"""
    weight_decay: float = 0.0
    """decoupled weight decay (AdamW) on every trained parameter; 0 is plain Adam"""

    # Diagnostics
    probe_every: int = 20
    """fit and log the linear state probes every this many iterations (and at the last); the on-policy probe
    needs --num-envs >= 2 (it fits on half of the environments and scores on the other half)"""
    image_every: int = 100
    """log the CLS token's attention maps and the probe set's embedding (TensorBoard's projector) every this many
    iterations (and at the last)"""

    # filled in at runtime
    batch_size: int = 0
    """the batch size (computed: num_envs * num_steps)"""
    minibatch_size: int = 0
    """the mini-batch size (computed: batch_size // num_minibatches)"""
    num_iterations: int = 0
    """the number of iterations (computed: total_timesteps // batch_size)"""


def check_args(args: Args) -> Optional[str]:
    """Return a one-line error naming the offending flag, or None when the flags make sense."""
    positive = ["total_timesteps", "num_envs", "num_steps", "num_minibatches", "update_epochs", "frame_height",
                "frame_width", "frame_gap", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio",
                "predictor_hidden", "eval_episodes", "probe_every", "image_every", "learning_rate", "clip_coef",
                "max_grad_norm"]
    for name in positive:
        if not getattr(args, name) > 0:
            return f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}"
    for name in ["gamma", "gae_lambda", "ema_tau"]:
        if not 0.0 <= getattr(args, name) <= 1.0:
            return f"--{name.replace('_', '-')} must lie in [0, 1], got {getattr(args, name)}"
    for name in ["ent_coef", "vf_coef", "jepa_coef", "var_coef", "weight_decay", "lr_warmup_iters"]:
        if not getattr(args, name) >= 0.0:
            return f"--{name.replace('_', '-')} must be non-negative, got {getattr(args, name)}"
    batch_size = args.num_envs * args.num_steps
    if batch_size % args.num_minibatches:
        return (f"--num-minibatches must divide the batch of {batch_size} steps (--num-envs x --num-steps), "
                f"got {args.num_minibatches}")
    if args.total_timesteps < batch_size:
        return f"--total-timesteps must be at least one batch ({batch_size} steps), got {args.total_timesteps}"
    for name in ["frame_height", "frame_width"]:
        if getattr(args, name) % args.patch_size:
            return f"--{name.replace('_', '-')} ({getattr(args, name)}) must be divisible by --patch-size ({args.patch_size})"
    if args.patch_embed == "conv" and args.patch_size & (args.patch_size - 1):
        return f"--patch-embed conv needs a power of two for --patch-size, got {args.patch_size}"
    if args.encoder == "cnn" and min(args.frame_height, args.frame_width) < 16:
        return f"--encoder cnn needs frames of at least 16 x 16 pixels, got --frame-height {args.frame_height} --frame-width {args.frame_width}"
    if args.embed_dim % args.num_heads:
        return f"--num-heads ({args.num_heads}) must divide --embed-dim ({args.embed_dim})"
    if not args.jepa and not args.rl_grad:
        return "--no-jepa with --no-rl-grad leaves the encoder without any training signal; use --jepa or --rl-grad"
    if args.eval_checkpoint is not None:
        if not os.path.isfile(args.eval_checkpoint):
            return f"--eval-checkpoint: no such file: {args.eval_checkpoint}"
        try:  # torch.load takes tensors and plain values only: a file from elsewhere cannot run code here
            load_policy(args.eval_checkpoint, "cpu")
        except Exception:
            return f"--eval-checkpoint: {args.eval_checkpoint} is not a model.pt written by --save-model"
    return None


def parse_args(argv=None) -> Args:
    """tyro's parser, with every error boiled down to one line and no run directory touched."""
    tyro_errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(tyro_errors):
            args = tyro.cli(Args, args=argv)
    except SystemExit as e:
        if e.code:  # tyro draws a box: a title, the message (wrapped), a rule, hints; keep the message, one line
            lines = [line.strip(" |+-\u2502\u256d\u256e\u2570\u256f\u2500") for line in tyro_errors.getvalue().splitlines()]
            after_title = itertools.dropwhile(lambda line: not line, lines[1:])  # a plain terminal puts a rule first
            message = " ".join(itertools.takewhile(bool, after_title)) or "invalid arguments"
            sys.exit(f"error: {message} (see --help)")
        raise
    error = check_args(args)
    if error:
        sys.exit(f"error: {error}")
    args.batch_size = args.num_envs * args.num_steps
    args.minibatch_size = args.batch_size // args.num_minibatches
    args.num_iterations = args.total_timesteps // args.batch_size
    return args


# ---------------------------------------------------------------------------------------------------
# Pixels: Gymnasium's CartPole scene drawn in torch
# ---------------------------------------------------------------------------------------------------
# Geometry of gymnasium/envs/classic_control/cartpole.py `render`, in the 600 x 400 frame after its
# vertical flip (y points down). pygame truncates every coordinate to whole pixels and fills the pixels
# whose corner lies inside a shape, so each shape covers [trunc(a), trunc(b) + 1): we reproduce that.
SCREEN_WIDTH, SCALE = 600, 600 / (2 * 2.4)  # 125 pixels per metre
CROP_TOP, CROP_BOTTOM = 165, 325  # the rows where cart and pole can ever be (non-white rows: 172-314)
CART_TOP, CART_BOTTOM, TRACK_ROW = 284.0, 315.0, 299.0
PIVOT_Y = 292.5  # pole axle, 107.5 above the bottom in Gymnasium's own (unflipped) coordinates
AXLE_RADIUS = 5.5
# grayscale shades of Gymnasium's colours (ITU-R 601 luma): pole (202, 152, 101), axle (129, 132, 203)
POLE_GRAY = 0.299 * 202 + 0.587 * 152 + 0.114 * 101
AXLE_GRAY = 0.299 * 129 + 0.587 * 132 + 0.114 * 203


def interval_coverage(lo, hi, pixel_lo, pixel_hi):
    """Fraction of each pixel interval [pixel_lo, pixel_hi) covered by [lo, hi) (broadcasts)."""
    return (torch.minimum(hi, pixel_hi) - torch.maximum(lo, pixel_lo)).clamp(min=0) / (pixel_hi - pixel_lo)


@functools.lru_cache(maxsize=8)
def pixel_grid(height: int, width: int, device: torch.device) -> dict:
    """What `render_cartpole` needs about the output pixels that no state changes: computed once per size."""
    sx, sy = SCREEN_WIDTH / width, (CROP_BOTTOM - CROP_TOP) / height  # source pixels per output pixel
    left = torch.arange(width, device=device, dtype=torch.float32) * sx  # (W,) pixel edges
    top = CROP_TOP + torch.arange(height, device=device, dtype=torch.float32) * sy  # (H,)
    bottom = top + sy
    row_coverage = lambda lo, hi: interval_coverage(torch.tensor(lo, device=device), torch.tensor(hi, device=device), top, bottom)
    axle_rows = slice(int((PIVOT_Y - AXLE_RADIUS - CROP_TOP) // sy), math.ceil((PIVOT_Y + AXLE_RADIUS - CROP_TOP) / sy))
    return {
        "sx": sx, "sy": sy, "left": left, "right": left + sx,
        "centre_x": left + sx / 2, "centre_y": (top + sy / 2)[:, None],  # (W,) and (H, 1)
        "cart_rows": 255.0 * row_coverage(CART_TOP, CART_BOTTOM)[:, None],  # (H, 1), times the cart's darkness
        "track_keep": 1.0 - row_coverage(TRACK_ROW, TRACK_ROW + 1)[:, None],  # (H, 1)
        # the axle stays on the few rows around the pivot: it is drawn on those alone
        "axle_rows": axle_rows, "axle_top": top[axle_rows, None, None], "axle_bottom": bottom[axle_rows, None, None],
        "axle_sub_x": left[:, None] + (torch.arange(4, device=device) + 0.5) * (sx / 4),  # (W, 4) sub-column centres
        # the pole's corners in its own frame (+-5 across its axis, -5..120 along it), clockwise on screen
        "pole_across": torch.tensor([-5.0, -5.0, 5.0, 5.0], device=device),
        "pole_along": torch.tensor([-5.0, 120.0, 120.0, -5.0], device=device),
    }


def render_cartpole(states: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Draw CartPole states (N, 4) as anti-aliased grayscale frames (N, height, width), uint8.

    Each output pixel holds the area average of Gymnasium's frame (cropped to rows 165-325, full width)
    over its footprint: exact for the axis-aligned cart and track, a close analytic estimate for the pole
    (product of its four edge ramps) and the axle (integrated over 4 sub-columns).
    """
    n, grid = states.shape[0], pixel_grid(height, width, states.device)
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
    half_chord = (AXLE_RADIUS**2 - (grid["axle_sub_x"] - torch.trunc(cart_x)[:, :, None] - 0.5) ** 2).clamp(min=0).sqrt()
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


def initial_stack(states: torch.Tensor, height: int, width: int, length: int) -> torch.Tensor:
    """(N, 4) first states of episodes -> (N, length, H, W): the missing earlier frames repeat the first."""
    return render_cartpole(states, height, width)[:, None].repeat(1, length, 1, 1)


def encoder_view(history: torch.Tensor, gap: int) -> torch.Tensor:
    """(N, 2 gap + 1, H, W) frames t-2gap .. t -> (N, 3, H, W) frames (t-2gap, t-gap, t): the encoder's input."""
    assert history.shape[1] == 2 * gap + 1, f"a history of {history.shape[1]} frames does not fit --frame-gap {gap}"
    return history[:, ::gap]


def push_frame(stack: torch.Tensor, frame: torch.Tensor, episode_start: torch.Tensor) -> torch.Tensor:
    """(N, L, H, W) frames (t-L+1, ..., t) -> (t-L+2, ..., t+1); a new episode repeats its first frame."""
    shifted = torch.cat([stack[:, 1:], frame[:, None]], dim=1)
    restarted = frame[:, None].expand_as(stack)
    return torch.where(episode_start[:, None, None, None], restarted, shifted)


def step_envs(envs, action, stack, is_reset_step, height, width):
    """One vector step: returns (state, reward, terminated, done, next stack, info), tensors on the stack's device.

    `is_reset_step` marks the environments whose previous step ended an episode: Gymnasium's NEXT_STEP
    autoreset makes this step a reset (reward 0, not a transition), and the state it returns is the new
    episode's first, which then fills the whole stack. `done` marks the next step as such a reset step.
    """
    state, reward, terminated, truncated, info = envs.step(action.cpu().numpy())
    device = stack.device
    state = torch.as_tensor(state, device=device)
    next_stack = push_frame(stack, render_cartpole(state, height, width), is_reset_step)
    as_float = lambda array: torch.as_tensor(array, dtype=torch.float32, device=device)
    return state, as_float(reward), as_float(terminated), torch.as_tensor(terminated | truncated, device=device), next_stack, info


# ---------------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------------
def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class Block(nn.Module):
    """Pre-norm transformer block with fused attention."""

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


def to_pixels(frames, ink: bool):
    """uint8 intensities -> floats (floats pass through: `encoder_input` made them). Ink, not light (the default):
    the white background becomes 0, so empty patches embed to the bias alone and the few with cart and pole stand
    out; raw intensity adds one large shared component to every token."""
    if frames.is_floating_point():
        return frames
    return torch.rsub(frames, 1.0, alpha=1 / 255) if ink else frames * (1 / 255)


def encoder_input(frames, ink: bool, frame_diffs: bool):
    """(B, 3, H, W) uint8 -> the same, or with --frame-diffs floats (t-1 - (t-2), t - (t-1), t): a difference
    of uint8 would wrap around, so these are taken after `to_pixels` (in ink, minus the intensity differences)."""
    if not frame_diffs:
        return frames  # the ViT's linear embedding rearranges uint8 first (a cheap copy), then makes floats
    pixels = to_pixels(frames, ink)
    return torch.cat([pixels[:, 1:] - pixels[:, :-1], pixels[:, 2:]], dim=1)


class ViTEncoder(nn.Module):
    """Frames (B, 3, H, W) uint8 -> embedding (B, D): the CLS token's output after the last block."""

    def __init__(self, args: Args):
        super().__init__()
        p, d = args.patch_size, args.embed_dim
        self.patch_size, self.rows, self.cols = p, args.frame_height // p, args.frame_width // p
        self.frames_per_token = 3 if args.tubelets else 1
        if args.patch_embed == "linear":
            self.patch_embed = nn.Linear(self.frames_per_token * p * p, d)
        else:  # each stride-2 convolution halves the grid: log2(p) of them turn a p x p patch into one token
            widths = [self.frames_per_token] + [min(16 * 2**i, d) for i in range(int(math.log2(p)))]
            convs = [layer for c_in, c_out in zip(widths, widths[1:]) for layer in (layer_init(nn.Conv2d(c_in, c_out, 3, 2, 1)), nn.ReLU())]
            # orthogonal init, as CleanRL's convolutions: with PyTorch's default the tokens' input-dependent part starts
            # about 100 times smaller than the linear embedding's, and configuration 2's embedding collapsed
            self.patch_embed = nn.Sequential(*convs, layer_init(nn.Conv2d(widths[-1], d, 1)))
        # positional encoding over (frame, row, column): a learned table per axis, summed (a tubelet spans
        # all frames, so its frame table has one row)
        self.frame_pos = nn.Parameter(0.02 * torch.randn(3 // self.frames_per_token, 1, 1, d))
        self.row_pos = nn.Parameter(0.02 * torch.randn(1, self.rows, 1, d))
        self.col_pos = nn.Parameter(0.02 * torch.randn(1, 1, self.cols, d))
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, d))
        self.blocks = nn.ModuleList(Block(d, args.num_heads, args.mlp_ratio) for _ in range(args.depth))
        self.ln_f = nn.LayerNorm(d) if args.final_ln else nn.Identity()
        self.ink, self.frame_diffs = args.ink, args.frame_diffs

    def embed_patches(self, frames):
        """(B, 3, H, W) uint8 -> tokens (B, n, rows, cols, D), n = 3 per-frame tokens or 1 tubelet per patch position."""
        B, p, n = frames.shape[0], self.patch_size, 3 // self.frames_per_token
        frames = encoder_input(frames, self.ink, self.frame_diffs)
        if isinstance(self.patch_embed, nn.Sequential):  # the convolutional stem sees whole frames (or stacks)
            grid = self.patch_embed(to_pixels(frames, self.ink).view(B * n, self.frames_per_token, *frames.shape[2:]))
            return grid.view(B, n, -1, self.rows, self.cols).permute(0, 1, 3, 4, 2)
        patches = frames.view(B, 3, self.rows, p, self.cols, p).permute(0, 1, 2, 4, 3, 5)  # (B, 3, rows, cols, p, p)
        if self.frames_per_token == 3:  # a tubelet holds its patch in frames t-2, t-1, t side by side
            patches = patches.permute(0, 2, 3, 1, 4, 5)[:, None]  # (B, 1, rows, cols, 3, p, p)
        # uint8 rearranged first (a cheap copy), then turned into floats in one operation
        return self.patch_embed(to_pixels(patches.reshape(B, n, self.rows, self.cols, -1), self.ink))

    def pre_norm(self, frames):
        """(B, 3, H, W) uint8 -> (B, D): the CLS token after the last block, before the final LayerNorm."""
        B = frames.shape[0]
        tokens = (self.embed_patches(frames) + self.frame_pos + self.row_pos + self.col_pos).flatten(1, 3)  # (B, n * rows * cols, D)
        x = torch.cat([self.cls_token.expand(B, -1, -1), tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        return x[:, 0]

    def forward(self, frames):
        return self.ln_f(self.pre_norm(frames))


class CNNEncoder(nn.Module):
    """Frames (B, 3, H, W) uint8 -> embedding (B, D), the frames as channels: --encoder cnn, a baseline."""

    def __init__(self, args: Args):
        super().__init__()
        self.ink, self.frame_diffs = args.ink, args.frame_diffs
        self.convs = nn.Sequential(nn.Conv2d(3, 32, 4, stride=2), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2), nn.ReLU(),
                                   nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(), nn.Flatten())
        flat = self.convs(torch.zeros(1, 3, args.frame_height, args.frame_width)).shape[1]  # 64 x 5 x 21 at 32 x 96
        self.fc = nn.Linear(flat, args.embed_dim)
        self.ln_f = nn.LayerNorm(args.embed_dim) if args.final_ln else nn.Identity()

    def pre_norm(self, frames):
        return self.fc(self.convs(to_pixels(encoder_input(frames, self.ink, self.frame_diffs), self.ink)))

    def forward(self, frames):
        return self.ln_f(self.pre_norm(frames))


def make_encoder(args: Args) -> nn.Module:
    return ViTEncoder(args) if args.encoder == "vit" else CNNEncoder(args)


class Predictor(nn.Module):
    """Two-layer MLP: s_x (B, D) and action (B,) -> predicted s_y (B, D)."""

    def __init__(self, embed_dim, hidden, num_actions=2):
        super().__init__()
        self.num_actions = num_actions
        self.fc1, self.fc2 = nn.Linear(embed_dim, hidden), nn.Linear(hidden, embed_dim)
        self.action_proj = nn.Linear(num_actions, hidden)  # the one-hot action, added after the first layer

    def forward(self, s_x, action):
        one_hot = F.one_hot(action.long(), self.num_actions).float()
        return self.fc2(F.gelu(self.fc1(s_x) + self.action_proj(one_hot)))


def make_heads(embed_dim, num_actions=2):
    """Actor and critic: small MLPs that see only the embedding."""
    actor = nn.Sequential(layer_init(nn.Linear(embed_dim, 64)), nn.Tanh(), layer_init(nn.Linear(64, num_actions), std=0.01))
    critic = nn.Sequential(layer_init(nn.Linear(embed_dim, 64)), nn.Tanh(), layer_init(nn.Linear(64, 1), std=1.0))
    return actor, critic


def make_agent(args: Args, device):
    """x-encoder, y-encoder, predictor, actor, critic, and one Adam over all that is trained.

    The y-encoder starts as an exact copy of the x-encoder and is never optimized. Adam is elementwise, so the
    modules share it without sharing a step: their gradients are clipped apart (`clip_grad_norms`)."""
    encoder = make_encoder(args).to(device)
    target_encoder = make_encoder(args).to(device)
    target_encoder.load_state_dict(encoder.state_dict())
    target_encoder.requires_grad_(False)
    predictor = Predictor(args.embed_dim, args.predictor_hidden).to(device)
    actor, critic = (head.to(device) for head in make_heads(args.embed_dim))
    trained = [p for module in (encoder, predictor, actor, critic) for p in module.parameters()]
    # fused: one kernel over all parameter tensors instead of a Python loop
    optimizer = torch.optim.Adam(trained, lr=args.learning_rate, eps=1e-5, weight_decay=args.weight_decay,
                                 decoupled_weight_decay=True, fused=True)
    return encoder, target_encoder, predictor, actor, critic, optimizer


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, tau: float):
    """theta_target <- tau * theta_target + (1 - tau) * theta_online."""
    for p_target, p_online in zip(target.parameters(), online.parameters()):
        p_target.lerp_(p_online, 1.0 - tau)


# ---------------------------------------------------------------------------------------------------
# Losses and diagnostics
# ---------------------------------------------------------------------------------------------------
def jepa_loss(prediction, target):
    """Squared Euclidean distance between prediction and y-embedding, averaged over the batch."""
    return (prediction - target).pow(2).sum(-1).mean()


def embedding_variance(s):
    """The paper's collapse indicator: batch-wise variance of each dimension, averaged over dimensions."""
    return s.var(dim=0).mean()


def variance_loss(s_x):
    """L_var = -min(1, mean_d Var_batch(s_x)): rewards spread up to unit variance, then stops."""
    return -embedding_variance(s_x).clamp(max=1.0)


def effective_rank(s):
    """exp(entropy) of the normalized singular values of a batch of embeddings (B, D), centred first: 1 when
    the batch varies along one direction (or not at all), D when evenly in all; a shared offset is no direction."""
    singular = torch.linalg.svdvals((s - s.mean(0)).double())
    p = singular / singular.sum().clamp(min=1e-12)
    return torch.exp(-(p * torch.log(p.clamp(min=1e-12))).sum()).item()


def probe_r2(s_fit, y_fit, s_test, y_test, ridge=1e-3):
    """R^2 per target column of a linear least-squares probe fitted on one half and scored on the other."""
    def with_bias(s):
        return torch.cat([s.double(), torch.ones(len(s), 1, dtype=torch.double, device=s.device)], dim=1)
    X, Xt = with_bias(s_fit), with_bias(s_test)
    eye = torch.eye(X.shape[1], dtype=torch.double, device=X.device)
    weights = torch.linalg.solve(X.T @ X + ridge * len(X) * eye, X.T @ y_fit.double())
    residual = ((y_test.double() - Xt @ weights) ** 2).sum(0)
    total = ((y_test.double() - y_test.double().mean(0)) ** 2).sum(0).clamp(min=1e-12)
    return (1 - residual / total).tolist()


STATE_VARIABLES = ["cart_position", "cart_velocity", "pole_angle", "pole_velocity"]  # CartPole's state, in order
PROBE_STATES = 512  # half to fit the probe, half to score it
PROBE_BOX = np.array([2.0, 1.5, 0.12, 1.5])  # |x|, |x_dot|, |theta|, |theta_dot|: two steps stay inside the limits


def make_probe_set(seed: int, height: int, width: int, device, gap: int = 1) -> tuple:
    """Fixed frame stacks (PROBE_STATES, 3, H, W) and their true states (PROBE_STATES, 4) for the linear probe.

    States are drawn uniformly from PROBE_BOX and played 2 * gap steps forward by Gymnasium with random pushes,
    so each stack (frames 0, gap, 2 gap) shows real motion; the label is the state of its last frame. Independent
    states, unlike the rows of a rollout, so fitting on one half and scoring on the other measures what the
    embedding holds. With a gap above 1 a pole may pass Gymnasium's limits: it is drawn there, not reset.
    """
    rng = np.random.default_rng(seed)
    envs = gym.make_vec("CartPole-v1", num_envs=PROBE_STATES, vectorization_mode="vector_entry_point")
    envs.reset(seed=seed)
    envs.unwrapped.state = rng.uniform(-PROBE_BOX, PROBE_BOX, size=(PROBE_STATES, 4)).T  # Gymnasium's (4, N) layout
    state = torch.as_tensor(envs.unwrapped.state.T, dtype=torch.float32, device=device)
    frames = [render_cartpole(state, height, width)]
    for step in range(1, 2 * gap + 1):
        state, *_ = envs.step(rng.integers(0, 2, PROBE_STATES))
        envs.unwrapped.prev_done[:] = False  # no NEXT_STEP autoreset inside a probe stack
        state = torch.as_tensor(state, device=device)
        if step % gap == 0:
            frames.append(render_cartpole(state, height, width))
    envs.close()
    return torch.stack(frames, dim=1), state


IMAGE_STACKS = 4  # probe stacks shown with their attention maps
ONPOLICY_PROBE_ROLLOUTS = 20  # the on-policy probe reads every fourth step of the last 20 rollouts: 1,280 stacks


def onpolicy_probe_r2(encoder, pool) -> list:
    """R^2 of the linear probe on the states the policy visits.

    `pool` holds recent rollouts as (stacks (T, N, 3, H, W), states (T, N, 4), valid (T, N)), the state being
    that of each stack's last frame. The current encoder embeds them; the probe is fitted on the first half of
    the environments and scored on the other half, so fit and score never share an episode.
    """
    stacks, states, valid = (torch.cat(parts) for parts in zip(*pool))
    in_fit_half = torch.arange(valid.shape[1], device=valid.device) < valid.shape[1] // 2  # (N,)
    fit = in_fit_half.expand_as(valid)[valid]  # (valid rows,), row order of stacks[valid]
    with torch.no_grad():
        s = encoder(stacks[valid])
    states = states[valid]
    return probe_r2(s[fit], states[fit], s[~fit], states[~fit])


# ---------------------------------------------------------------------------------------------------
# Checkpoints, greedy play and pictures
# ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def cls_attention(encoder, frames) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> (B, 3, H, W): the CLS token's attention weight on each patch in the last block (mean
    over heads), spread over the patch's pixels; a tubelet's weight shows in all three of its frames."""
    last, seen = encoder.blocks[-1], {}
    hook = last.register_forward_pre_hook(lambda module, inputs: seen.update(x=inputs[0]))
    try:
        encoder.pre_norm(frames)
    finally:
        hook.remove()
    x = seen["x"]  # (B, T, D): the tokens entering the last block
    B, T, D = x.shape
    q, k, _ = last.qkv(last.ln_1(x)).view(B, T, 3, last.num_heads, D // last.num_heads).permute(2, 0, 3, 1, 4)
    weights = (q[:, :, :1] @ k.transpose(-2, -1) / math.sqrt(D // last.num_heads)).softmax(-1)  # (B, heads, 1, T)
    to_patches = weights.mean(1)[:, 0, 1:].view(B, -1, encoder.rows, encoder.cols).expand(B, 3, -1, -1)  # CLS itself dropped
    return to_patches.repeat_interleave(encoder.patch_size, 2).repeat_interleave(encoder.patch_size, 3)


def attention_image(frames, attention) -> torch.Tensor:
    """Frames (B, 3, H, W) and their attention maps -> one RGB image (3, B * H, 3 * W): a stack per row, its frames
    t-2, t-1, t side by side, each stack's attention in red over the gray frames (from its least to its most
    attended patch); under --frame-diffs the tokens drawn over t-2 and t-1 read the differences, not these frames."""
    gray = frames.float() / 255
    low, high = attention.amin(dim=(1, 2, 3), keepdim=True), attention.amax(dim=(1, 2, 3), keepdim=True)
    heat = 0.7 * (attention - low) / (high - low).clamp(min=1e-12)
    rgb = torch.stack([gray * (1 - heat) + heat, gray * (1 - heat), gray * (1 - heat)])  # (3, B, 3, H, W)
    return rgb.permute(0, 1, 3, 2, 4).flatten(3, 4).flatten(1, 2)


def save_checkpoint(path: str, args: Args, encoder, target_encoder, predictor, actor, critic):
    modules = {"encoder": encoder, "target_encoder": target_encoder, "predictor": predictor, "actor": actor, "critic": critic}
    torch.save({"args": asdict(args), **{name: module.state_dict() for name, module in modules.items()}}, path)


def load_policy(checkpoint_path: str, device) -> tuple:
    """(Args, x-encoder, actor) of a checkpoint written by `save_checkpoint`."""
    checkpoint = torch.load(checkpoint_path, map_location=device, weights_only=True)
    saved = Args(**{k: v for k, v in checkpoint["args"].items() if k in Args.__dataclass_fields__})
    encoder, actor = make_encoder(saved).to(device), make_heads(saved.embed_dim)[0].to(device)
    encoder.load_state_dict(checkpoint["encoder"])
    actor.load_state_dict(checkpoint["actor"])
    return saved, encoder, actor


@torch.no_grad()
def play_greedy(encoder, actor, args: Args, episodes: int, seed: int, gif_path: Optional[str] = None) -> float:
    """Play `episodes` greedy episodes (one per environment) and return their mean return; with `gif_path`,
    save the first environment's episode there, drawn at the crop's full resolution (160 x 600)."""
    device = next(encoder.parameters()).device
    envs = make_envs(episodes)
    state, _ = envs.reset(seed=seed)
    state = torch.as_tensor(state, device=device)
    history = initial_stack(state, args.frame_height, args.frame_width, 2 * args.frame_gap + 1)
    is_reset_step = torch.zeros(episodes, dtype=torch.bool, device=device)
    draw = lambda state: render_cartpole(state[:1], CROP_BOTTOM - CROP_TOP, SCREEN_WIDTH)[0].cpu().numpy()
    returns, finished, gif_frames = np.zeros(episodes), np.zeros(episodes, dtype=bool), [draw(state)] if gif_path else []
    while not finished.all():
        action = actor(encoder(encoder_view(history, args.frame_gap))).argmax(-1)
        state, _, _, is_reset_step, history, info = step_envs(envs, action, history, is_reset_step, args.frame_height, args.frame_width)
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


def compute_advantages(rewards, values, next_value, terminations, dones, gamma, gae_lambda):
    """GAE over (num_steps, num_envs) tensors.

    With NEXT_STEP autoreset the row after a done holds that episode's final state, so at a truncation
    the return bootstraps from the value of the truncated state (values[t + 1]); at a termination it
    does not. The done cuts the recursion, so the reset row's own (meaningless) advantage never leaks
    backwards; that row is masked out of every loss.
    """
    advantages = torch.zeros_like(rewards)
    lastgaelam = torch.zeros_like(next_value)
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

    advantages = mb["advantages"]
    if args.norm_adv:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    pg_loss = torch.max(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)).mean()

    v_loss = (newvalue - mb["returns"]) ** 2
    if args.clip_vloss:
        v_clipped = mb["values"] + torch.clamp(newvalue - mb["values"], -args.clip_coef, args.clip_coef)
        v_loss = torch.max(v_loss, (v_clipped - mb["returns"]) ** 2)
    v_loss = 0.5 * v_loss.mean()

    # Without --jepa the predictor still trains, on detached embeddings, so that losses/jepa_loss
    # stays a comparable measure of how predictable s_y is; no JEPA gradient reaches the encoder.
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


# ---------------------------------------------------------------------------------------------------
# Rollout, batch and update: the three steps of one training iteration
# ---------------------------------------------------------------------------------------------------
def make_rollout_storage(args: Args, device) -> dict:
    """Row t of each buffer belongs to the stack the agent saw at step t; `stacks` has one row more: the stack
    after the last step. So row t + 1 of `stacks` holds frames (t-1, t, t+1), the y-encoder's input for row t
    (with --frame-gap g: t+1-2g, t+1-g, t+1)."""
    T, N, H, W, D = args.num_steps, args.num_envs, args.frame_height, args.frame_width, args.embed_dim
    zeros = lambda *shape, dtype=torch.float32: torch.zeros(shape, dtype=dtype, device=device)
    return {
        "stacks": zeros(T + 1, N, 3, H, W, dtype=torch.uint8),
        "states": zeros(T, N, 4),  # true state of each stack's last frame: for the probes only, never for training
        "valid": zeros(T, N, dtype=torch.bool),  # False on the reset steps of NEXT_STEP autoreset: no transition
        "actions": zeros(T, N, dtype=torch.long), "logprobs": zeros(T, N), "values": zeros(T, N),
        "rewards": zeros(T, N), "terminations": zeros(T, N),
        "dones": zeros(T, N),  # terminated or truncated by row t's action: row t + 1 is a reset step
        "embeddings": zeros(T, N, D), "pre_norm": zeros(T, N, D),  # s_x, and the encoder's output before the final LayerNorm
    }


def collect_rollout(envs, encoder, actor, critic, rollout: dict, env_state: dict, timings: dict, gap: int) -> list:
    """Play one rollout with the current policy into `rollout` (in place); return the episodes that ended.

    `env_state` carries the environments' current state, their last 2 gap + 1 frames (`encoder_view` picks the
    stack from them; --frame-gap) and reset-step flags from one rollout to the next. The reward, termination
    and done of row t are those that row t's action produced. Each ended episode comes back as (row, return,
    length)."""
    episodes = []
    for step in range(rollout["actions"].shape[0]):
        t0 = time.perf_counter()
        stack = encoder_view(env_state["history"], gap)
        rollout["stacks"][step], rollout["states"][step], rollout["valid"][step] = stack, env_state["state"], ~env_state["is_reset_step"]
        with torch.no_grad():
            h = encoder.pre_norm(stack)
            s_x = encoder.ln_f(h)
            probs = Categorical(logits=actor(s_x), validate_args=False)
            action = probs.sample()
            rollout["values"][step] = critic(s_x).flatten()
        rollout["embeddings"][step], rollout["pre_norm"][step] = s_x, h
        rollout["actions"][step], rollout["logprobs"][step] = action, probs.log_prob(action)
        t1 = time.perf_counter()
        timings["inference"] += t1 - t0

        state, reward, terminated, done, next_history, info = step_envs(
            envs, action, env_state["history"], env_state["is_reset_step"], stack.shape[2], stack.shape[3])
        rollout["rewards"][step], rollout["terminations"][step], rollout["dones"][step] = reward, terminated, done
        env_state.update(state=state, history=next_history, is_reset_step=done)
        if "_episode" in info:
            episodes += [(step, float(info["episode"]["r"][i]), int(info["episode"]["l"][i])) for i in np.flatnonzero(info["_episode"])]
        timings["env"] += time.perf_counter() - t1
    rollout["stacks"][-1] = encoder_view(env_state["history"], gap)
    return episodes


def make_batch(args: Args, rollout: dict, encoder, target_encoder, critic) -> dict:
    """One rollout -> the flat batch of its real transitions with advantages, returns and JEPA targets.

    The value of the stack after the last row bootstraps the return. The JEPA target of row t is the
    y-encoder's embedding of row t + 1's stack, frames (t-1, t, t+1); with --fresh-targets `update` embeds it
    per minibatch instead. The reset rows of NEXT_STEP autoreset are no transitions and are dropped."""
    stacks, values = rollout["stacks"], rollout["values"]  # (T + 1, N, 3, H, W), (T, N)
    with torch.no_grad():
        next_value = critic(encoder(stacks[-1])).flatten()
        advantages = compute_advantages(rollout["rewards"], values, next_value, rollout["terminations"], rollout["dones"],
                                        args.gamma, args.gae_lambda)
        batch = {"stacks": stacks[:-1], "next_stacks": stacks[1:], "actions": rollout["actions"], "logprobs": rollout["logprobs"],
                 "advantages": advantages, "returns": advantages + values, "values": values}
        batch = {k: v.flatten(0, 1) for k, v in batch.items()}
        if not args.fresh_targets:
            batch["targets"] = target_encoder(batch.pop("next_stacks"))  # (T * N, D), once for the whole rollout
    keep = rollout["valid"].flatten()
    return {k: v[keep] for k, v in batch.items()}


def clip_grad_norms(modules: dict, max_norm: float) -> dict:
    """Clip each module's gradient by its own norm, so that no loss rescales the step of a module it does not
    reach (the diagnostic predictor of --no-jepa, the critic under --no-rl-grad); return the norms before.

    The arithmetic of `nn.utils.clip_grad_norm_`, to the bit, in two fused calls per module: its general
    path costs more than the clipping itself at this model size."""
    norms = {}
    for name, module in modules.items():
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        norms[name] = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        torch._foreach_mul_(grads, (max_norm / (norms[name] + 1e-6)).clamp(max=1.0))
    return norms


def update(args: Args, encoder, target_encoder, predictor, actor, critic, optimizer, batch: dict) -> dict:
    """PPO's update epochs over one batch, the JEPA (and variance) loss in every minibatch, the y-encoder's EMA.

    Returns the last minibatch's losses, the mean clip fraction and the last step's gradient norms."""
    modules = {"encoder": encoder, "predictor": predictor, "actor": actor, "critic": critic}
    num_valid, clipfracs = len(batch["actions"]), []
    for epoch in range(args.update_epochs):
        for mb_inds in torch.randperm(num_valid, device=batch["actions"].device).tensor_split(args.num_minibatches):
            mb = {k: v[mb_inds] for k, v in batch.items()}
            if args.fresh_targets:
                with torch.no_grad():
                    mb["targets"] = target_encoder(mb.pop("next_stacks"))
            losses = minibatch_losses(args, encoder, predictor, actor, critic, mb)
            clipfracs.append(losses["clipfrac"].item())
            if not torch.isfinite(losses["loss"]):
                raise FloatingPointError(f"non-finite loss ({losses['loss'].item()})")

            optimizer.zero_grad()
            losses["loss"].backward()
            grad_norms = clip_grad_norms(modules, args.max_grad_norm)
            optimizer.step()
            if not args.ema_per_iteration:
                ema_update(target_encoder, encoder, args.ema_tau)

        if args.target_kl is not None and losses["approx_kl"] > args.target_kl:
            break
    if args.ema_per_iteration:
        ema_update(target_encoder, encoder, args.ema_tau)
    return {**losses, "clipfrac": float(np.mean(clipfracs)), **{f"grad_norm_{k}": v for k, v in grad_norms.items()}}


def configuration_name(args: Args) -> str:
    return f"{'jepa' if args.jepa else 'nojepa'}-{'rlgrad' if args.rl_grad else 'norlgrad'}-{'var' if args.var_reg else 'novar'}"


def make_run_dir(args: Args) -> str:
    """<runs_dir>/<exp>__<configuration>__s<seed>__<unix time>[_k]: never shared by two runs, even started together."""
    base = os.path.join(args.runs_dir, f"{args.exp_name}__{configuration_name(args)}__s{args.seed}__{int(time.time())}")
    os.makedirs(args.runs_dir, exist_ok=True)
    for k in range(1000):
        run_dir = base if k == 0 else f"{base}_{k}"
        try:
            os.mkdir(run_dir)  # atomic: exactly one process succeeds for a given name
            return run_dir
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a fresh run directory next to {base}")


def format_seconds(seconds: float) -> str:
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


if __name__ == "__main__":
    args = parse_args()
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    if args.eval_checkpoint is not None:
        saved, encoder, actor = load_policy(args.eval_checkpoint, device)
        gif_path = os.path.join(os.path.dirname(args.eval_checkpoint), "greedy_episode.gif") if args.capture_video else None
        mean_return = play_greedy(encoder, actor, saved, args.eval_episodes, args.seed, gif_path)
        print(f"mean return over {args.eval_episodes} greedy episodes: {mean_return:.1f}" + (f"; first saved to {gif_path}" if gif_path else ""))
        sys.exit(0)

    run_dir = make_run_dir(args)
    writer = SummaryWriter(run_dir)
    writer.add_text(
        "hyperparameters",
        "|param|value|\n|-|-|\n%s" % ("\n".join([f"|{key}|{value}|" for key, value in vars(args).items()])),
    )

    # env setup
    envs = make_envs(args.num_envs)
    H, W = args.frame_height, args.frame_width

    encoder, target_encoder, predictor, actor, critic, optimizer = make_agent(args, device)
    rollout = make_rollout_storage(args, device)

    # Linear probes ask what the embedding holds about the true state: on a fixed set of stacks spread over
    # the state space, and on the states the policy has visited lately (its recent rollouts, re-embedded)
    probe_stacks, probe_states = make_probe_set(args.seed, H, W, device, args.frame_gap)
    onpolicy_pool = deque(maxlen=ONPOLICY_PROBE_ROLLOUTS)

    global_step, start_time = 0, time.time()
    timings = {"env": 0.0, "inference": 0.0, "update": 0.0, "probe": 0.0}
    recent_returns = deque(maxlen=20)
    first_state, _ = envs.reset(seed=args.seed)
    first_state = torch.as_tensor(first_state, device=device)
    # With NEXT_STEP autoreset the step after a done only resets: it is no transition and enters no loss.
    env_state = {"state": first_state, "history": initial_stack(first_state, H, W, 2 * args.frame_gap + 1),
                 "is_reset_step": torch.zeros(args.num_envs, dtype=torch.bool, device=device)}
    first_stacks = encoder_view(env_state["history"], args.frame_gap)[:4]
    writer.add_image("observations/frame_stacks", first_stacks.permute(0, 2, 1, 3).reshape(4 * H, 3 * W), 0, dataformats="HW")

    try:
        for iteration in range(1, args.num_iterations + 1):
            frac = 1.0 - (iteration - 1.0) / args.num_iterations if args.anneal_lr else 1.0
            # Adam's first steps move each weight by about lr, whatever its gradient: its variance estimate rests on few samples
            if args.lr_warmup_iters:
                frac *= min(1.0, iteration / args.lr_warmup_iters)
            optimizer.param_groups[0]["lr"] = frac * args.learning_rate

            episodes = collect_rollout(envs, encoder, actor, critic, rollout, env_state, timings, args.frame_gap)
            for row, episodic_return, episodic_length in episodes:
                recent_returns.append(episodic_return)
                writer.add_scalar("charts/episodic_return", episodic_return, global_step + (row + 1) * args.num_envs)
                writer.add_scalar("charts/episodic_length", episodic_length, global_step + (row + 1) * args.num_envs)
            global_step += args.batch_size
            # every fourth step is enough for the probe: neighbouring steps are nearly the same sample
            onpolicy_pool.append((rollout["stacks"][:-1:4].clone(), rollout["states"][::4].clone(), rollout["valid"][::4].clone()))

            t0 = time.perf_counter()
            batch = make_batch(args, rollout, encoder, target_encoder, critic)
            losses = update(args, encoder, target_encoder, predictor, actor, critic, optimizer, batch)
            timings["update"] += time.perf_counter() - t0

            # collapse diagnostics on the rollout's own embeddings (no extra forward pass)
            valid = rollout["valid"]
            b_embeddings = rollout["embeddings"][valid]  # (num_valid, D)
            variance = embedding_variance(b_embeddings).item()
            y_pred, y_true = batch["values"].cpu().numpy(), batch["returns"].cpu().numpy()
            var_y = np.var(y_true)
            explained_var = np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y

            writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
            for name in ["value_loss", "policy_loss", "entropy", "approx_kl", "jepa_loss", "var_loss"]:
                writer.add_scalar(f"losses/{name}", losses[name].item(), global_step)
            writer.add_scalar("losses/clipfrac", losses["clipfrac"], global_step)
            writer.add_scalar("losses/explained_variance", explained_var, global_step)
            for name in ["encoder", "predictor", "actor", "critic"]:
                writer.add_scalar(f"grad_norm/{name}", losses[f"grad_norm_{name}"].item(), global_step)
            writer.add_scalar("embedding/variance", variance, global_step)
            writer.add_scalar("embedding/variance_pre_ln", embedding_variance(rollout["pre_norm"][valid]).item(), global_step)
            if args.final_ln:
                writer.add_scalar("embedding/ln_gain_norm", encoder.ln_f.weight.norm().item(), global_step)
            if "targets" in batch:
                writer.add_scalar("embedding/target_variance", embedding_variance(batch["targets"]).item(), global_step)
            writer.add_scalar("embedding/collapsed", float(variance < 1e-7), global_step)
            writer.add_scalar("embedding/effective_rank", effective_rank(b_embeddings), global_step)
            last = iteration == args.num_iterations
            probe_now, images_now = (iteration - 1) % args.probe_every == 0 or last, (iteration - 1) % args.image_every == 0 or last
            t0 = time.perf_counter()
            if probe_now or images_now:
                with torch.no_grad():
                    probe_embeddings = encoder(probe_stacks)  # (PROBE_STATES, D), for the probe and the projector
            if probe_now:
                half = PROBE_STATES // 2
                r2 = probe_r2(probe_embeddings[:half], probe_states[:half], probe_embeddings[half:], probe_states[half:])
                for name, value in zip(STATE_VARIABLES, r2):
                    writer.add_scalar(f"probe/r2_{name}", value, global_step)
                if args.num_envs >= 2:
                    for name, value in zip(STATE_VARIABLES, onpolicy_probe_r2(encoder, onpolicy_pool)):
                        writer.add_scalar(f"probe/onpolicy_r2_{name}", value, global_step)
                timings["probe"] += time.perf_counter() - t0
            if images_now:
                shown = probe_stacks[:IMAGE_STACKS]
                if args.encoder == "vit":
                    writer.add_image("attention/cls_to_patches", attention_image(shown, cls_attention(encoder, shown)), global_step)
                # colour the points by any state variable in TensorBoard's projector; thumbnails show the last frame
                writer.add_embedding(probe_embeddings, metadata=probe_states.tolist(), metadata_header=STATE_VARIABLES,
                                     label_img=probe_stacks[:, 2:].float() / 255, global_step=global_step, tag="probe_set")
            elapsed = time.time() - start_time
            sps = int(global_step / elapsed)
            writer.add_scalar("charts/SPS", sps, global_step)
            for name, seconds in timings.items():
                writer.add_scalar(f"perf/{name}_seconds", seconds, global_step)
            mean_return = np.mean(recent_returns) if recent_returns else float("nan")
            eta = elapsed / iteration * (args.num_iterations - iteration)
            print(f"step {global_step:7d} ({100 * iteration / args.num_iterations:5.1f}%) | return {mean_return:6.1f} "
                  f"| SPS {sps:5d} | left {format_seconds(eta)}", flush=True)
        if args.capture_video:
            gif_path = os.path.join(run_dir, "greedy_episode.gif")
            greedy_return = play_greedy(encoder, actor, args, args.eval_episodes, args.seed, gif_path)
            writer.add_scalar("charts/greedy_return", greedy_return, global_step)
            print(f"mean return over {args.eval_episodes} greedy episodes: {greedy_return:.1f}; first saved to {gif_path}")
    except KeyboardInterrupt:
        print(f"interrupted at global step {global_step}; logs flushed to {run_dir}")
    except FloatingPointError as e:
        writer.close()
        sys.exit(f"error: {e} at global step {global_step}; logs flushed to {run_dir}")
    finally:
        if args.save_model:
            model_path = os.path.join(run_dir, "model.pt")
            save_checkpoint(model_path, args, encoder, target_encoder, predictor, actor, critic)
            print(f"model saved to {model_path}")
        envs.close()
        writer.close()
