"""Where a CNN embedding's variance goes: ReLU activity and the pre-LayerNorm split into constant and signal.

    python scripts/cnn_dip.py runs/diag_relu     # every <run>/model.pt below it, written with --encoder cnn --save-model

For each checkpoint, on 512 probe stacks (`make_probe_set`, seed 123) and for the x-encoder at initialisation (the
run's seed) and after training: per ReLU layer, the share of activations that are on, of units (channel, row,
column) off on every stack, and of channels off everywhere on every stack; then the pre-LN vector's per-feature
variance over stacks (the signal) against its squared mean (the constant), the norm of the mean conv feature
and of its image under the linear layer, and the variance of the LayerNorm's output (the logged
`embedding/variance` measures that, on rollout frames).
"""

import glob
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jepa_ppo_cartpole as jp  # noqa: E402

for path in sorted(glob.glob(os.path.join(sys.argv[1], "*", "model.pt"))):
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    args = jp.Args(**{k: v for k, v in checkpoint["args"].items() if k in jp.Args.__dataclass_fields__})
    frames, _ = jp.make_probe_set(123, args.frame_height, args.frame_width, torch.device("cpu"), args.frame_gap)
    print(os.path.basename(os.path.dirname(path)))
    for when in ["init", "trained"]:
        torch.manual_seed(args.seed)
        encoder = jp.make_encoder(args)
        if when == "trained":
            encoder.load_state_dict(checkpoint["encoder"])
        with torch.no_grad():
            x = jp.to_pixels(jp.encoder_input(frames, encoder.ink, encoder.frame_diffs), encoder.ink)
            layers = []
            for layer in encoder.convs:
                x = layer(x)  # (512, C, h, w), flattened by the last layer
                if isinstance(layer, torch.nn.ReLU):
                    on = x > 0
                    layers.append(f"on {on.float().mean():.2f}, units off {(~on.any(0)).float().mean():.2f}, "
                                  f"channels off {(~on.any(0).flatten(1).any(1)).float().mean():.2f}")
            pre = encoder.fc(x)  # (512, D)
            print(f"  {when}: ReLUs " + " | ".join(layers))
            print(f"    pre-LN variance {pre.var(0).mean():.2e}, squared mean {pre.mean(0).pow(2).mean():.2e}; "
                  f"|mean conv feature| {x.mean(0).norm():.2f}, |its image| {(x.mean(0) @ encoder.fc.weight.T).norm():.2f}; "
                  f"embedding variance {encoder.ln_f(pre).var(0).mean():.2e}")
