"""Where a CNN embedding's variance goes: ReLU activity, and the pre-LayerNorm vector split into what the
LayerNorm removes and what it keeps.

    python docs/research/cnn_dip.py runs/diag_relu     # every <run>/model.pt below it, written with --encoder cnn --save-model

For each checkpoint, on 512 probe stacks (the lab's `make_probe_set`, seed 123), for the x-encoder at the run's own
initialisation and after training:
- per ReLU layer, the share of activations that are on, of units (channel, row, column) off on every stack, and
  of channels off at every position on every stack;
- the pre-LN vector's per-feature variance over stacks and its squared mean (the constant); the share of that
  variance along the constant's direction and along the all-ones direction (a stack that differs from another
  only by the constant's scale or by a shift of all features looks the same after the LayerNorm, which subtracts
  the vector's mean over features and divides by its spread); the variance left, over the mean squared spread,
  which predicts the embedding's variance; and the embedding variance itself (the logged `embedding/variance`
  measures it on rollout frames);
- the norm of the mean conv feature, of its image under the linear layer, and the layer's largest singular
  value, which say whether the constant grows in the convolutions or in the linear layer.
"""

import argparse
import glob
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import jepa_ppo_cartpole_lab as lab  # noqa: E402


def relu_activity(encoder, x) -> tuple:
    """Runs the convolutions layer by layer: (flattened conv features (N, F), one line per ReLU)."""
    lines = []
    for layer in encoder.convs:
        x = layer(x)
        if isinstance(layer, torch.nn.ReLU):
            on = x > 0  # (N, C, h, w)
            lines.append(f"on {on.float().mean():.2f}, units off {(~on.any(0)).float().mean():.2f}, "
                         f"channels off {(~on.any(0).flatten(1).any(1)).float().mean():.2f}")
    return x, lines


def variance_split(pre) -> str:
    """pre (N, D): how much of its variance over stacks the LayerNorm keeps."""
    centred = pre - pre.mean(0)
    total = centred.pow(2).sum(1).mean()
    along_mean = (centred @ (pre.mean(0) / pre.mean(0).norm())).pow(2).mean()
    ones = torch.ones(pre.shape[1]) / pre.shape[1] ** 0.5
    rest = centred - torch.outer(centred @ ones, ones)
    direction = pre.mean(0) - (pre.mean(0) @ ones) * ones  # the constant with its feature mean removed
    rest = rest - torch.outer(rest @ (direction / direction.norm()), direction / direction.norm())
    spread = pre.var(1, unbiased=False).mean()  # the LayerNorm divides each stack by the root of its spread
    return (f"variance {pre.var(0).mean():.2e}, squared mean {pre.mean(0).pow(2).mean():.2e}; "
            f"share along the constant {along_mean / total:.2f}, along all-ones {(centred @ ones).pow(2).mean() / total:.2f}; "
            f"left {rest.pow(2).sum(1).mean() / pre.shape[1]:.2e} / spread {spread:.2e} = "
            f"{rest.pow(2).sum(1).mean() / pre.shape[1] / spread:.2e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logdir", help="a directory whose <run>/model.pt files were written with --encoder cnn --save-model")
    paths = sorted(glob.glob(os.path.join(parser.parse_args().logdir, "*", "model.pt")))
    if not paths:
        sys.exit("no <run>/model.pt below that directory")
    for path in paths:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        fields = lab.LabArgs.__dataclass_fields__
        args = lab.LabArgs(**{k: v for k, v in checkpoint["args"].items() if k in fields})
        if args.encoder != "cnn":
            sys.exit(f"{path}: --encoder {args.encoder}, this script reads CNN checkpoints")
        frames, _ = lab.make_probe_set(123, args.frame_height, args.frame_width, torch.device("cpu"), args.frame_gap)
        print(os.path.basename(os.path.dirname(path)))
        for when in ["init", "trained"]:
            # the training loop seeds torch and then draws nothing before make_encoder: this is the run's own init
            torch.manual_seed(args.seed)
            encoder = lab.make_encoder(args)
            if when == "trained":
                encoder.load_state_dict(checkpoint["encoder"])
            with torch.no_grad():
                view = lab.encoder_input(frames, encoder.gap, encoder.ink, encoder.frame_diffs)
                pixels = lab.to_pixels(view, encoder.ink)
                flat, lines = relu_activity(encoder, pixels)
                pre = encoder.fc(flat)  # (N, D)
                image = flat.mean(0) @ encoder.fc.weight.T  # the mean conv feature through the linear layer, bias left out
                print(f"  {when}: ReLUs " + " | ".join(lines))
                print(f"    pre-LN {variance_split(pre)}; embedding variance {encoder.ln_f(pre).var(0).mean():.2e}")
                print(f"    |mean conv feature| {flat.mean(0).norm():.2f}, |its image| {image.norm():.2f}, "
                      f"|bias| {encoder.fc.bias.norm():.2f}, largest singular value {torch.linalg.matrix_norm(encoder.fc.weight, 2):.2f}")


if __name__ == "__main__":
    main()
