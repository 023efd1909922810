"""The lab: everything beyond the paper, on top of the reference jepa_ppo_cartpole.py.

    python jepa_ppo_cartpole_lab.py [any flag of the reference] [lab flags]

Every flag of the reference works here unchanged; with no lab flag a run logs the same values, to the bit, as the
reference (`jepa_ppo_cartpole_lab_test.py` checks it) and adds the lab's diagnostics on top:

    diagnostics  linear probes of the true state (a fixed set and on-policy), the CLS token's attention maps, the probe
                 set in TensorBoard's projector, the embedding's effective rank, the final LayerNorm's gain, the targets'
                 variance, timings
    encoders     --encoder cnn, and ViT variants: --tubelets, --patch-embed conv, --frame-diffs, --frame-gap
    prediction   --jepa-steps K: the predictor rolled K steps ahead on its own outputs, against the y-embeddings of
                 the stacks t+1 ... t+K (SPR-style)
    ablations    the ingredients of configuration 3's collapse: --fresh-targets, --ema-per-iteration, --no-ink,
                 --no-final-ln, --weight-decay, and the predictor's pace: --predictor-lr-mult, --predictor
    evaluation   --eval-checkpoint: play a saved model's greedy policy (with --capture-video, save a GIF beside it)

The lab reuses the reference's rollout, batch, update, losses and logs; it never changes the reference's code path.
"""

import dataclasses
import math
import os
import pickle
import sys
import time
import zipfile
from collections import deque
from dataclasses import dataclass
from typing import Literal, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn

import jepa_ppo_cartpole as ref


@dataclass
class LabArgs(ref.Args):
    # Encoders beyond the paper
    encoder: Literal["vit", "cnn"] = "vit"
    """the x- and y-encoder: the paper's ViT, or a small CNN that reads the three frames as channels (convolutions
    32x4x4 stride 2, 64x3x3 stride 2, 64x3x3 stride 1, ReLU; a linear layer to --embed-dim; the final LayerNorm)"""
    patch_embed: Literal["linear", "conv"] = "linear"
    """how the ViT turns patches into tokens: the paper's linear projection, or log2(--patch-size) 3x3 stride-2
    convolutions with ReLU and a 1x1 convolution (after Xiao et al. 2021, without BatchNorm), same grid and positions"""
    tubelets: bool = False
    """if toggled, one ViT token per patch position spanning all three frames (V-JEPA-style): 12 tokens + CLS"""
    frame_diffs: bool = False
    """if toggled, the encoder reads frames t-2 and t-1 as their differences t-1 - (t-2) and t - (t-1), and frame t"""
    frame_gap: int = 1
    """steps between the three frames: the x-encoder reads (t-2g, t-g, t), the y-encoder (t+1-2g, t+1-g, t+1)"""
    # The JEPA objective beyond the paper's one step
    jepa_steps: int = 1
    """prediction horizon K: the predictor is applied K times, each to its previous output and the action taken at that
    step; the JEPA loss averages the squared distances to the y-embeddings of the stacks t+1 ... t+K (1: the paper)"""
    # Ingredients of configuration 3's collapse
    fresh_targets: bool = False
    """if toggled, the y-encoder embeds each minibatch's targets just before its step, not once per rollout"""
    ema_per_iteration: bool = False
    """if toggled, move the y-encoder once per iteration (after its last optimizer step) instead of after every step"""
    ink: bool = True
    """feed the encoder ink (1 - intensity, the white background is 0); --no-ink feeds raw intensities"""
    final_ln: bool = True
    """normalize the encoder's output with a LayerNorm (learnable gain and bias) to give the embedding"""
    weight_decay: float = 0.0
    """decoupled weight decay (AdamW) on every trained parameter; 0 is plain Adam"""
    predictor_lr_mult: float = 1.0
    """the predictor's learning rate as a multiple of the encoder's (and the heads'), warm-up and annealing included"""
    predictor: Literal["mlp", "linear", "closed-form"] = "mlp"
    """the paper's two-layer MLP; a linear map from s_x and the one-hot action, trained like it; or that linear map
    refit by least squares to the whole batch before every optimizer step and never stepped: it always keeps up"""
    # Diagnostics and evaluation
    probe_every: int = 20
    """fit and log the linear state probes every this many iterations (and at the last)"""
    image_every: int = 100
    """log the attention maps and the probe set's projector every this many iterations (and at the last)"""
    eval_checkpoint: Optional[str] = None
    """if set, do not train: load this model.pt, play --eval-episodes greedy episodes, print their mean return"""
    eval_episodes: int = 10
    """number of greedy episodes played by --eval-checkpoint and by --capture-video"""


def check_jepa_steps(args) -> Optional[str]:
    """--jepa-steps' own check (the lab's and the Atari script's): a one-line error naming the flag, or None."""
    if not 1 <= args.jepa_steps <= args.num_steps:
        return (f"--jepa-steps must be positive and at most --num-steps ({args.num_steps}): no rollout holds a target "
                f"further ahead, got {args.jepa_steps}")
    return None


def check_lab_args(args: LabArgs) -> Optional[str]:
    """The reference's checks, then the lab's: a one-line error naming the flag, or None."""
    if error := ref.check_args(args):
        return error
    for name in ["frame_gap", "probe_every", "image_every", "eval_episodes"]:
        if not getattr(args, name) > 0:
            return f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}"
    if not args.weight_decay >= 0.0:
        return f"--weight-decay must be non-negative, got {args.weight_decay}"
    if not 0.0 < args.predictor_lr_mult < float("inf"):
        return f"--predictor-lr-mult must be positive and finite, got {args.predictor_lr_mult}"
    if args.predictor == "closed-form" and args.predictor_lr_mult != 1.0:
        return (f"--predictor-lr-mult must be 1 with --predictor closed-form (refit, never stepped), "
                f"got {args.predictor_lr_mult}")
    if error := check_jepa_steps(args):
        return error
    if args.jepa_steps > 1 and (args.fresh_targets or args.predictor == "closed-form"):
        flag = "--fresh-targets" if args.fresh_targets else "--predictor closed-form"
        return f"--jepa-steps must be 1 with {flag}, which predicts one step only, got {args.jepa_steps}"
    if args.patch_embed == "conv" and args.patch_size & (args.patch_size - 1):
        return f"--patch-embed conv needs a power of two for --patch-size, got {args.patch_size}"
    if args.encoder == "cnn" and min(args.frame_height, args.frame_width) < 16:
        return (f"--encoder cnn needs frames of at least 16 x 16 pixels, got --frame-height {args.frame_height} "
                f"--frame-width {args.frame_width}")
    if args.eval_checkpoint is not None and not os.path.exists(args.eval_checkpoint):
        return f"--eval-checkpoint: no such file: {args.eval_checkpoint}"
    if args.eval_checkpoint is not None and not os.path.isfile(args.eval_checkpoint):
        return f"--eval-checkpoint: {args.eval_checkpoint} is a directory or a device, not a model.pt file"
    return None


# -- Encoders beyond the paper ----------------------------------------------------------------------------------------
def to_pixels(frames, ink: bool):
    """uint8 intensities -> floats, as ink (1 - intensity) or light; floats (frame differences) pass through."""
    if frames.is_floating_point():
        return frames
    return torch.rsub(frames, 1.0, alpha=1 / 255) if ink else frames * (1 / 255)


def encoder_input(history, gap: int, ink: bool, frame_diffs: bool):
    """(B, 2 gap + 1, H, W) uint8 frames t-2gap .. t -> (B, 3, H, W): frames (t-2gap, t-gap, t), uint8, or with
    --frame-diffs floats (t-gap - (t-2gap), t - (t-gap), t), taken after `to_pixels` (uint8 would wrap around)."""
    assert history.shape[1] == 2 * gap + 1, f"a history of {history.shape[1]} frames does not fit --frame-gap {gap}"
    frames = history[:, ::gap]
    if not frame_diffs:
        return frames
    pixels = to_pixels(frames, ink)
    return torch.cat([pixels[:, 1:] - pixels[:, :-1], pixels[:, 2:]], dim=1)


class LabViT(ref.ViTEncoder):
    """The reference's ViT reading frame histories (B, 2 gap + 1, H, W), with the lab's inputs and tokens."""

    def __init__(self, args: LabArgs):
        rng = torch.get_rng_state()
        super().__init__(args.frame_height, args.frame_width, args.patch_size, args.embed_dim, args.depth,
                         args.num_heads, args.mlp_ratio)
        p, d = args.patch_size, args.embed_dim
        self.gap, self.ink, self.frame_diffs = args.frame_gap, args.ink, args.frame_diffs
        self.frames_per_token = 3 if args.tubelets else 1
        if args.tubelets or args.patch_embed == "conv":
            # other token embeddings: draw every parameter again in the order the layers were created, the order
            # of the runs recorded before the reference and the lab were split
            torch.set_rng_state(rng)
            if args.patch_embed == "linear":
                self.patch_proj = nn.Linear(self.frames_per_token * p * p, d)
            else:  # each stride-2 convolution halves the grid: log2(p) of them turn a p x p patch into one token
                widths = [self.frames_per_token] + [min(16 * 2**i, d) for i in range(int(math.log2(p)))]
                convs = [layer for c_in, c_out in zip(widths, widths[1:])
                         for layer in (ref.layer_init(nn.Conv2d(c_in, c_out, 3, 2, 1)), nn.ReLU())]
                # orthogonal init, as CleanRL's convolutions: PyTorch's default starts the tokens' input-dependent
                # part about 100 times smaller than the linear embedding's
                self.patch_proj = nn.Sequential(*convs, ref.layer_init(nn.Conv2d(widths[-1], d, 1)))
            self.frame_pos = nn.Parameter(0.02 * torch.randn(3 // self.frames_per_token, 1, 1, d))
            for name in ["row_pos", "col_pos", "cls_token"]:
                setattr(self, name, nn.Parameter(0.02 * torch.randn_like(getattr(self, name))))
            for module in self.blocks.modules():
                if isinstance(module, nn.Linear):
                    module.reset_parameters()
        if not args.final_ln:
            self.ln_f = nn.Identity()

    def embed_patches(self, history):
        """(B, 2 gap + 1, H, W) uint8 -> tokens (B, n, rows, cols, D), n = 3 per-frame tokens or 1 tubelet."""
        B, p, n = history.shape[0], self.patch_size, 3 // self.frames_per_token
        frames = encoder_input(history, self.gap, self.ink, self.frame_diffs)
        if isinstance(self.patch_proj, nn.Sequential):  # the convolutional stem sees whole frames (or stacks)
            grid = self.patch_proj(to_pixels(frames, self.ink).view(B * n, self.frames_per_token, *frames.shape[2:]))
            return grid.view(B, n, -1, self.rows, self.cols).permute(0, 1, 3, 4, 2)
        patches = frames.view(B, 3, self.rows, p, self.cols, p).permute(0, 1, 2, 4, 3, 5)  # (B, 3, rows, cols, p, p)
        if self.frames_per_token == 3:  # a tubelet holds its patch in frames t-2, t-1, t side by side
            patches = patches.permute(0, 2, 3, 1, 4, 5)[:, None]  # (B, 1, rows, cols, 3, p, p)
        # uint8 rearranged first (a cheap copy), then turned into floats in one operation
        return self.patch_proj(to_pixels(patches.reshape(B, n, self.rows, self.cols, -1), self.ink))


class CNNEncoder(nn.Module):
    """Frame histories (B, 2 gap + 1, H, W) uint8 -> embedding (B, D), the three frames as channels: a baseline."""

    def __init__(self, args: LabArgs):
        super().__init__()
        self.gap, self.ink, self.frame_diffs = args.frame_gap, args.ink, args.frame_diffs
        self.convs = nn.Sequential(nn.Conv2d(3, 32, 4, stride=2), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2), nn.ReLU(),
                                   nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(), nn.Flatten())
        flat = self.convs(torch.zeros(1, 3, args.frame_height, args.frame_width)).shape[1]  # 64 x 5 x 21 at 32 x 96
        self.fc = nn.Linear(flat, args.embed_dim)
        self.ln_f = nn.LayerNorm(args.embed_dim) if args.final_ln else nn.Identity()

    def pre_norm(self, history):
        frames = encoder_input(history, self.gap, self.ink, self.frame_diffs)
        return self.fc(self.convs(to_pixels(frames, self.ink)))

    def forward(self, history):
        return self.ln_f(self.pre_norm(history))


def uses_reference_encoder(args: LabArgs) -> bool:
    return (args.encoder == "vit" and args.patch_embed == "linear" and not args.tubelets and not args.frame_diffs
            and args.frame_gap == 1 and args.ink and args.final_ln)


def make_encoder(args: LabArgs) -> nn.Module:
    """The reference's own ViT when no lab flag changes the encoder; else the lab's variant."""
    if uses_reference_encoder(args):
        return ref.make_vit(args)
    return CNNEncoder(args) if args.encoder == "cnn" else LabViT(args)


class LinearPredictor(nn.Module):
    """--predictor linear or closed-form: s_x (B, D) and action (B,) -> [s_x, one-hot a] @ weight, (B, D); the one-hot
    columns are the per-action bias. It starts at 0."""

    def __init__(self, embed_dim=64, num_actions=2):
        super().__init__()
        self.num_actions = num_actions
        self.weight = nn.Parameter(torch.zeros(embed_dim + num_actions, embed_dim))

    def features(self, s_x, action):
        return torch.cat([s_x, nn.functional.one_hot(action.long(), self.num_actions).to(s_x.dtype)], dim=1)

    def forward(self, s_x, action):
        return self.features(s_x, action) @ self.weight

    @torch.no_grad()
    def refit(self, s_x, action, targets) -> float:
        """Set the weight to the least-squares solution and return the JEPA loss it leaves. No ridge, which would
        swamp the small directions of an embedding near collapse. The LayerNorm and the one-hot columns make the
        features rank-deficient, an exact null direction that float32 rounding puts at about 1e-8 of the largest
        singular value: the pseudo-inverse drops what lies under 1e-6 and keeps the rest (minimum norm)."""
        features = self.features(s_x, action).double()
        self.weight.copy_(torch.linalg.pinv(features, rtol=1e-6) @ targets.double())
        return ref.jepa_loss(self(s_x, action), targets).item()


def refit_predictor(predictor: LinearPredictor, encoder, batch: dict) -> float:
    """Fit the closed-form predictor to the whole batch: s_x of the encoder as it is now, the batch's JEPA targets."""
    with torch.no_grad():
        s_x = encoder(batch["stacks"])
    rows = torch.arange(len(s_x), device=s_x.device)  # indexes --fresh-targets' lazy targets as well
    return predictor.refit(s_x, batch["actions"], batch["targets"][rows])


class RefitAfterEachStep:
    """Stands for the optimizer under --predictor closed-form: `ref.update` calls `zero_grad` and `step`, and each step
    is followed by a refit, so every minibatch's step meets the predictor that is optimal for the encoder it moves."""

    def __init__(self, optimizer, refit):
        self.optimizer, self.refit, self.jepa_loss_refit = optimizer, refit, refit()

    def zero_grad(self):
        self.optimizer.zero_grad()

    def step(self):
        self.optimizer.step()
        self.jepa_loss_refit = self.refit()


def make_agent(args: LabArgs, device):
    """The reference's agent with the lab's encoder and predictor, AdamW's decoupled weight decay when asked for, and
    the predictor in a parameter group of its own when its learning rate is a multiple of the others'
    (`set_learning_rate`): 0 for the closed-form predictor, which is refit, never stepped."""
    encoder, target_encoder, predictor, actor, critic, optimizer = ref.make_agent(args, device, encoder_fn=make_encoder)
    shared = optimizer.param_groups[0]
    if args.weight_decay:
        shared.update(weight_decay=args.weight_decay, decoupled_weight_decay=True)
    if args.predictor_lr_mult != 1.0 or args.predictor != "mlp":
        in_predictor = {id(p) for p in predictor.parameters()}
        shared["params"] = [p for p in shared["params"] if id(p) not in in_predictor]
        if args.predictor != "mlp":  # the MLP is still built above, so every other module starts as in the reference
            predictor = LinearPredictor(args.embed_dim).to(device)
        lr_mult = 0.0 if args.predictor == "closed-form" else args.predictor_lr_mult
        optimizer.add_param_group({**{k: v for k, v in shared.items() if k != "params"},  # weight decay included
                                   "params": list(predictor.parameters()), "lr_mult": lr_mult,
                                   "lr": args.learning_rate * lr_mult})
    return encoder, target_encoder, predictor, actor, critic, optimizer


def set_learning_rate(optimizer, learning_rate: float):
    """The schedule's rate for every group, times the group's multiple (the predictor's, with --predictor-lr-mult)."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate * group.get("lr_mult", 1.0)


# -- Linear probes: what the embedding holds about the true state -----------------------------------------------------
STATE_VARIABLES = ["cart_position", "cart_velocity", "pole_angle", "pole_velocity"]  # CartPole's state, in order
PROBE_STATES = 512  # half to fit the probe, half to score it
PROBE_BOX = np.array([2.0, 1.5, 0.12, 1.5])  # |x|, |x_dot|, |theta|, |theta_dot|: two steps stay inside the limits
IMAGE_STACKS = 4  # probe stacks shown with their attention maps
ONPOLICY_PROBE_ROLLOUTS = 20  # the on-policy probe reads every fourth step of the last 20 rollouts: 1,280 stacks


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


def make_probe_set(seed: int, height: int, width: int, device, gap: int = 1) -> tuple:
    """Fixed frame histories (PROBE_STATES, 2 gap + 1, H, W) and the true states of their last frames (PROBE_STATES, 4).

    States are drawn uniformly from PROBE_BOX and played 2 gap steps forward by Gymnasium with random pushes, so each
    stack shows real motion. Independent states, unlike the rows of a rollout, so fitting on one half and scoring on
    the other measures what the embedding holds. With a gap above 1 a pole may pass Gymnasium's limits: it is drawn
    there, not reset."""
    rng = np.random.default_rng(seed)
    envs = gym.make_vec("CartPole-v1", num_envs=PROBE_STATES, vectorization_mode="vector_entry_point")
    envs.reset(seed=seed)
    envs.unwrapped.state = rng.uniform(-PROBE_BOX, PROBE_BOX, size=(PROBE_STATES, 4)).T  # Gymnasium's (4, N) layout
    state = torch.as_tensor(envs.unwrapped.state.T, dtype=torch.float32, device=device)
    frames = [ref.render_cartpole(state, height, width)]
    for _ in range(2 * gap):
        state, *_ = envs.step(rng.integers(0, 2, PROBE_STATES))
        envs.unwrapped.prev_done[:] = False  # no NEXT_STEP autoreset inside a probe stack
        state = torch.as_tensor(state, device=device)
        frames.append(ref.render_cartpole(state, height, width))
    envs.close()
    return torch.stack(frames, dim=1), state


def onpolicy_probe_r2(encoder, pool) -> list:
    """R^2 of the linear probe on the states the policy visits.

    `pool` holds recent rollouts as (stacks (T, N, L, H, W), states (T, N, 4), valid (T, N)), the state being that
    of each stack's last frame. The current encoder embeds them; the probe is fitted on the first half of the
    environments and scored on the other half, so fit and score never share an episode."""
    stacks, states, valid = (torch.cat(parts) for parts in zip(*pool))
    in_fit_half = torch.arange(valid.shape[1], device=valid.device) < valid.shape[1] // 2  # (N,)
    fit = in_fit_half.expand_as(valid)[valid]  # (valid rows,), row order of stacks[valid]
    with torch.no_grad():
        s = encoder(stacks[valid])
    states = states[valid]
    return probe_r2(s[fit], states[fit], s[~fit], states[~fit])


class StateRecorder(gym.vector.VectorWrapper):
    """Keeps the states that each vector step returns, for the on-policy probe (never for training)."""

    def __init__(self, envs):
        super().__init__(envs)
        self.states = []

    def step(self, actions):
        result = self.env.step(actions)
        self.states.append(result[0])
        return result


# -- Pictures ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def cls_attention(encoder, frames) -> torch.Tensor:
    """(B, L, H, W) uint8 -> (B, 3, H, W): the CLS token's attention weight on each patch in the last block (mean
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
    to_patches = weights.mean(1)[:, 0, 1:].view(B, -1, encoder.rows, encoder.cols).expand(B, 3, -1, -1)  # CLS dropped
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


def frame_stacks_image(stacks) -> torch.Tensor:
    """Up to four stacks (N, 3, H, W) -> a gray image (n H, 3 W): each stack a row, frames t-2, t-1, t side by side."""
    return stacks[:4].permute(0, 2, 1, 3).flatten(2, 3).flatten(0, 1)


# -- Checkpoints ------------------------------------------------------------------------------------------------------
ARCHITECTURE = ["frame_height", "frame_width", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio"]


class CheckpointError(Exception):
    pass


def load_policy(path: str, device) -> tuple:
    """(LabArgs, x-encoder, actor) of a model.pt written by --save-model (the reference's or the lab's), read once.

    A checkpoint must name every size of the reference's architecture; one without the lab's fields was written by
    the reference, whose encoder is the lab's with no lab flag. Raises CheckpointError with a one-line reason."""
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from e
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, IndexError, KeyError, zipfile.BadZipFile) as e:
        # what torch.load raises on a file that is no torch file, or one it cannot load here (weights_only: a foreign
        # file cannot run code); its own first line says which
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
        raise CheckpointError(f"{path} is not a model.pt that loads here ({reason})") from e
    parts = ("args", "encoder", "actor")
    if not (isinstance(checkpoint, dict) and all(isinstance(checkpoint.get(part), dict) for part in parts)):
        raise CheckpointError(f"{path} is not a model.pt written by --save-model (no args, encoder or actor)")
    missing = [name for name in ARCHITECTURE if name not in checkpoint["args"]]
    if missing:
        raise CheckpointError(f"{path} does not record {', '.join(missing)}: its architecture is unknown")
    saved = LabArgs(**{k: v for k, v in checkpoint["args"].items() if k in LabArgs.__dataclass_fields__})
    try:  # the ViT checks its sizes when built
        encoder, actor = make_encoder(saved).to(device), ref.make_heads(saved.embed_dim)[0].to(device)
    except ValueError as e:
        raise CheckpointError(f"{path}: its flags describe no encoder ({e})") from e
    # the patch projection was named patch_embed before the reference and the lab were split
    weights = {k.replace("patch_embed.", "patch_proj."): v for k, v in checkpoint["encoder"].items()}
    try:
        encoder.load_state_dict(weights)
        actor.load_state_dict(checkpoint["actor"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: its weights do not fit the architecture its flags describe") from e
    return saved, encoder, actor


def evaluate(args: LabArgs, device):
    """--eval-checkpoint: the greedy policy's mean return over --eval-episodes episodes; a GIF with --capture-video."""
    try:
        saved, encoder, actor = load_policy(args.eval_checkpoint, device)
    except CheckpointError as e:
        sys.exit(f"error: --eval-checkpoint: {e}")
    gif_path = os.path.join(os.path.dirname(args.eval_checkpoint), "greedy_episode.gif") if args.capture_video else None
    mean_return = ref.play_greedy(encoder, actor, saved.frame_height, saved.frame_width, args.eval_episodes, args.seed,
                                  gif_path, 2 * saved.frame_gap + 1)
    print(f"mean return over {args.eval_episodes} greedy episodes: {mean_return:.1f}"
          + (f"; first saved to {gif_path}" if gif_path else ""))


# -- The lab's loop: the reference's steps, and what the lab adds around them -----------------------------------------
class FreshTargets:
    """Stands for the batch's JEPA targets under --fresh-targets: indexing it embeds those rows' next stacks with the
    y-encoder as it is at that moment, so `ref.update` gets each minibatch's targets just before its step."""

    def __init__(self, target_encoder, next_stacks):
        self.target_encoder, self.next_stacks = target_encoder, next_stacks

    def __getitem__(self, rows):
        with torch.no_grad():
            return self.target_encoder(self.next_stacks[rows])


def lab_batch(args: LabArgs, rollout: dict, encoder, target_encoder, critic) -> dict:
    if args.jepa_steps > 1:
        return multistep_batch(args, rollout, encoder, target_encoder, critic)
    batch = ref.make_batch(args, rollout, encoder, target_encoder, critic)
    if args.fresh_targets:
        batch["targets"] = FreshTargets(target_encoder, rollout["stacks"][1:].flatten(0, 1)[rollout["valid"].flatten()])
    return batch


# -- K-step prediction (--jepa-steps K) --------------------------------------------------------------------------------
def multistep_targets(rollout: dict, next_embeddings, horizon: int) -> dict:
    """Row t's K-step JEPA inputs (K = horizon) from a rollout of T rows x N environments and the y-embeddings of its
    stacks 1 ... T (T, N, D): the targets, y-embeddings of the stacks t+1 ... t+K (T, N, K, D); the actions of rows
    t+1 ... t+K-1, taken by steps 2 ... K (T, N, K-1); and the steps that enter the loss (T, N, K). Step k+1 follows
    row t+k's action, so it enters only if rows t+1 ... t+k are transitions of row t's episode (no reset step: the
    stack after a done, the episode's last, is still a target) inside this rollout. Steps past the rollout's end are
    dropped, not carried to the next rollout: with T = 32 and K = 5 that is 10 of every 160 (row, step) pairs."""
    T = rollout["actions"].shape[0]
    pad = lambda x: torch.cat([x, x.new_zeros((horizon - 1, *x.shape[1:]))])  # rows past the rollout: never entered
    targets, actions, is_transition = pad(next_embeddings), pad(rollout["actions"]), pad(rollout["valid"])
    later = range(1, horizon)  # row t + k for step k + 1
    goes_on = torch.stack([is_transition[k:k + T] for k in later], dim=2).long().cumprod(dim=2).bool()  # (T, N, K-1)
    return {"targets": torch.stack([targets[k:k + T] for k in range(horizon)], dim=2),
            "later_actions": torch.stack([actions[k:k + T] for k in later], dim=2),
            "target_mask": torch.cat([torch.ones_like(goes_on[..., :1]), goes_on], dim=2)}


def multistep_batch(args: LabArgs, rollout: dict, encoder, target_encoder, critic) -> dict:
    """`ref.make_batch` with the K-step JEPA inputs of `multistep_targets` in place of the one-step targets; the
    y-encoder embeds each stack once, as in the reference, and its first step's targets are the reference's."""
    seen = {}

    def y_encoder(next_stacks):  # catches the y-embeddings of all T x N next stacks, before the reset rows go
        seen["y"] = target_encoder(next_stacks)
        return seen["y"]

    batch = ref.make_batch(args, rollout, encoder, y_encoder, critic)
    T, N = rollout["actions"].shape
    ahead = multistep_targets(rollout, seen["y"].view(T, N, -1), args.jepa_steps)
    return {**batch, **{k: v.flatten(0, 1)[rollout["valid"].flatten()] for k, v in ahead.items()}}


def predict_ahead(predictor, s_x, actions):
    """s_x (B, D) and actions (B, K) -> predictions (B, K, D): step 1 reads s_x, step k the prediction of step k-1."""
    predictions = [predictor(s_x, actions[:, 0])]
    for k in range(1, actions.shape[1]):
        predictions.append(predictor(predictions[-1], actions[:, k]))
    return torch.stack(predictions, dim=1)


def multistep_losses(args: LabArgs, encoder, predictor, actor, critic, mb: dict) -> dict:
    """`ref.minibatch_losses` with the K-step JEPA loss in place of its one-step term, whose weight is set to 0: the
    reference's predictor call is caught for its input (s_x, detached under --no-jepa), from which the predictor rolls
    K steps. The loss averages the squared distances over the (row, step) pairs that enter; one average per step too."""
    seen = {}

    def first_step(s_x, action):
        seen["s_x"] = s_x
        return predictor(s_x, action)

    one_step = {**mb, "targets": mb["targets"][:, 0]}
    no_one_step = dataclasses.replace(args, jepa_coef=0.0)
    losses = ref.minibatch_losses(no_one_step, encoder, first_step, actor, critic, one_step)
    actions = torch.cat([mb["actions"][:, None], mb["later_actions"]], dim=1)  # (B, K)
    distances = (predict_ahead(predictor, seen["s_x"], actions) - mb["targets"]).pow(2).sum(-1)  # (B, K)
    mask = mb["target_mask"]
    j_loss = distances[mask].mean()
    per_step = {f"jepa_loss_step{k + 1}": distances[:, k][mask[:, k]].mean() for k in range(args.jepa_steps)}
    return {**losses, "loss": losses["loss"] + args.jepa_coef * j_loss, "jepa_loss": j_loss, **per_step}


def log_jepa_steps(writer, losses: dict, horizon: int, global_step: int):
    """Under --jepa-steps K > 1, the JEPA loss of each step k, where any pair of the last minibatch reached step k
    (`losses/jepa_loss` is their average weighted by the pairs of each step)."""
    for k in range(1, horizon + 1) if horizon > 1 else []:
        loss = losses[f"jepa_loss_step{k}"].item()
        if not math.isnan(loss):  # NaN: no pair reached step k
            writer.add_scalar(f"losses/jepa_loss_step{k}", loss, global_step)


def lab_update(args: LabArgs, encoder, target_encoder, predictor, actor, critic, optimizer, batch: dict) -> dict:
    """`ref.update`, with the K-step JEPA loss under --jepa-steps; under --ema-per-iteration its per-step EMA is made a
    no-op (tau 1) and the y-encoder moves once; under --predictor closed-form the predictor is refit before the first
    step and after every step."""
    if args.predictor == "closed-form":
        optimizer = RefitAfterEachStep(optimizer, lambda: refit_predictor(predictor, encoder, batch))
    update_args = dataclasses.replace(args, ema_tau=1.0) if args.ema_per_iteration else args
    losses_fn = multistep_losses if args.jepa_steps > 1 else ref.minibatch_losses
    losses = ref.update(update_args, encoder, target_encoder, predictor, actor, critic, optimizer, batch, losses_fn)
    if args.ema_per_iteration:
        ref.ema_update(target_encoder, encoder, args.ema_tau)
    if args.predictor == "closed-form":
        losses["jepa_loss_refit"] = optimizer.jepa_loss_refit
    return losses


def effective_rank(s):
    """exp(entropy) of the normalized singular values of the centred batch (B, D): 1 to D directions of spread."""
    singular = torch.linalg.svdvals((s - s.mean(0)).double())
    p = singular / singular.sum().clamp(min=1e-12)
    return torch.exp(-(p * torch.log(p.clamp(min=1e-12))).sum()).item()


def log_diagnostics(writer, args: LabArgs, encoder, batch, probes: dict, onpolicy_pool, iteration, num_iterations,
                    global_step):
    """What the lab logs beyond the reference: the LayerNorm's gain, the targets' variance, probes, pictures."""
    if args.final_ln:
        writer.add_scalar("embedding/ln_gain_norm", encoder.ln_f.weight.norm().item(), global_step)
    if not args.fresh_targets:  # the first step's targets under --jepa-steps
        targets = batch["targets"] if args.jepa_steps == 1 else batch["targets"][:, 0]
        writer.add_scalar("embedding/target_variance", ref.embedding_variance(targets).item(), global_step)
    last = iteration == num_iterations
    probe_now = (iteration - 1) % args.probe_every == 0 or last
    images_now = (iteration - 1) % args.image_every == 0 or last
    if not (probe_now or images_now):
        return
    with torch.no_grad():
        embeddings = encoder(probes["stacks"])  # (PROBE_STATES, D), for the probe and the projector
    if probe_now:
        half = PROBE_STATES // 2
        r2 = probe_r2(embeddings[:half], probes["states"][:half], embeddings[half:], probes["states"][half:])
        for name, value in zip(STATE_VARIABLES, r2):
            writer.add_scalar(f"probe/r2_{name}", value, global_step)
        if args.num_envs >= 2:
            for name, value in zip(STATE_VARIABLES, onpolicy_probe_r2(encoder, onpolicy_pool)):
                writer.add_scalar(f"probe/onpolicy_r2_{name}", value, global_step)
    if images_now:
        shown = probes["stacks"][:IMAGE_STACKS]
        if args.encoder == "vit":
            frames = shown[:, ::args.frame_gap]
            writer.add_image("attention/cls_to_patches", attention_image(frames, cls_attention(encoder, shown)),
                             global_step)
        # colour the points by any state variable in TensorBoard's projector; thumbnails show the last frame
        writer.add_embedding(embeddings, metadata=probes["states"].tolist(), metadata_header=STATE_VARIABLES,
                             label_img=probes["stacks"][:, -1:].float() / 255, global_step=global_step, tag="probe_set")


if __name__ == "__main__":
    args = ref.parse_args(args_class=LabArgs, check=check_lab_args)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if args.eval_checkpoint is not None:
        evaluate(args, device)
        sys.exit(0)
    run_dir, writer, envs, first_state = ref.start_run(args, device)
    envs = StateRecorder(envs)
    encoder, target_encoder, predictor, actor, critic, optimizer = make_agent(args, device)
    H, W, batch_size = args.frame_height, args.frame_width, args.num_envs * args.num_steps
    num_iterations, history = args.total_timesteps // batch_size, 2 * args.frame_gap + 1
    rollout = ref.make_rollout_storage(args.num_steps, args.num_envs, (history, H, W), args.embed_dim, device)
    env_state = {"state": first_state, "stack": ref.initial_stack(first_state, H, W, history),
                 "is_reset_step": torch.zeros(args.num_envs, dtype=torch.bool, device=device)}
    writer.add_image("observations/frame_stacks", frame_stacks_image(env_state["stack"][:, ::args.frame_gap]), 0,
                     dataformats="HW")
    probe_stacks, probe_states = make_probe_set(args.seed, H, W, device, args.frame_gap)
    probes, onpolicy_pool = {"stacks": probe_stacks, "states": probe_states}, deque(maxlen=ONPOLICY_PROBE_ROLLOUTS)

    global_step, start_time, outcome, recent_returns = 0, time.time(), "crashed", deque(maxlen=20)
    timings = {"rollout": 0.0, "update": 0.0, "diagnostics": 0.0}
    try:
        for iteration in range(1, num_iterations + 1):
            set_learning_rate(optimizer, ref.learning_rate_at(args, iteration, num_iterations))
            t0 = time.perf_counter()
            row_states, envs.states = [env_state["state"]], []
            episodes = ref.collect_rollout(envs, encoder, actor, critic, rollout, env_state)
            row_states += [torch.as_tensor(state, device=device) for state in envs.states[:-1]]
            ref.log_episodes(writer, episodes, recent_returns, global_step, args.num_envs)
            t1 = time.perf_counter()
            batch = lab_batch(args, rollout, encoder, target_encoder, critic)
            losses = lab_update(args, encoder, target_encoder, predictor, actor, critic, optimizer, batch)
            t2 = time.perf_counter()
            global_step += batch_size
            ref.log_update(writer, losses, batch, rollout, optimizer.param_groups[0]["lr"], global_step)
            writer.add_scalar("embedding/effective_rank", effective_rank(rollout["embeddings"][rollout["valid"]]),
                              global_step)
            if args.predictor_lr_mult != 1.0:
                writer.add_scalar("charts/predictor_learning_rate", optimizer.param_groups[1]["lr"], global_step)
            if args.predictor == "closed-form":
                writer.add_scalar("losses/jepa_loss_refit", losses["jepa_loss_refit"], global_step)
            log_jepa_steps(writer, losses, args.jepa_steps, global_step)
            # every fourth step is enough for the on-policy probe: neighbouring steps are nearly the same sample
            onpolicy_pool.append((rollout["stacks"][:-1:4].clone(), torch.stack(row_states)[::4],
                                  rollout["valid"][::4].clone()))
            log_diagnostics(writer, args, encoder, batch, probes, onpolicy_pool, iteration, num_iterations,
                            global_step)
            for name, seconds in zip(timings, [t1 - t0, t2 - t1, time.perf_counter() - t2]):
                timings[name] += seconds
                writer.add_scalar(f"perf/{name}_seconds", timings[name], global_step)
            ref.log_progress(writer, global_step, start_time, recent_returns)
        if args.capture_video:
            gif_path = os.path.join(run_dir, "greedy_episode.gif")
            greedy_return = ref.play_greedy(encoder, actor, H, W, args.eval_episodes, args.seed, gif_path, history)
            writer.add_scalar("charts/greedy_return", greedy_return, global_step)
            print(f"mean return over {args.eval_episodes} greedy episodes: {greedy_return:.1f}; first in {gif_path}")
        outcome = "finished"
    except KeyboardInterrupt:
        outcome = "interrupted"
        print(f"interrupted at global step {global_step}; logs flushed to {run_dir}")
    except FloatingPointError as e:
        outcome = f"error: {e} at global step {global_step}; logs flushed to {run_dir}, no model saved"
    finally:  # a model is saved at the end or on Ctrl-C, never after a crash or a non-finite loss
        if args.save_model and outcome in ("finished", "interrupted"):
            ref.save_checkpoint(os.path.join(run_dir, "model.pt"), args, encoder, target_encoder, predictor, actor,
                                critic)
            print(f"model saved to {os.path.join(run_dir, 'model.pt')}")
        envs.close()
        writer.close()
    if outcome.startswith("error"):
        sys.exit(outcome)
