"""A model whose weights lie between two exported models of the same network (weight-space interpolation).

``(1 - alpha) * start + alpha * end``, tensor by tensor: with ``start`` a model and ``end`` its fine-tune, this keeps
part of what the fine-tune learnt and part of what it forgot (Wortsman et al. 2022, "Robust fine-tuning of zero-shot
models", WiSE-FT). The output takes ``end``'s network configuration (its intensity landmarks included) and training
record, the interpolation noted in it, and no calibration: calibrate it like any trained model. From the repository
root:

    PYTHONPATH=lib python scripts/interpolate_weights.py --start model/anofpdm.pt --end runs/ft42/model.pt \
        --alpha 0.5 --out runs/ft42_half.pt
"""

from __future__ import annotations

import argparse
from pathlib import Path

from anofpdm.method.model import (
    NetworkConfig, load_checkpoint, network_differences, save_checkpoint, weights_fingerprint,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--start", type=Path, required=True, help="the model at alpha 0")
    parser.add_argument("--end", type=Path, required=True, help="the model at alpha 1 (its config is kept)")
    parser.add_argument("--alpha", type=float, required=True, help="the share of --end's weights, in [0, 1]")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not 0.0 <= args.alpha <= 1.0:
        parser.error(f"--alpha must lie in [0, 1], got {args.alpha}")
    start, end = load_checkpoint(args.start), load_checkpoint(args.end)
    differ = network_differences(NetworkConfig.from_dict(start["network"]), NetworkConfig.from_dict(end["network"]))
    if start["schedule"] != end["schedule"]:
        differ["schedule"] = (start["schedule"], end["schedule"])
    if differ:
        parser.error(f"{args.start} and {args.end} are not the same network and noise schedule: "
                     + ", ".join(f"{k} {a!r} in --start, {b!r} in --end" for k, (a, b) in differ.items()))
    weights = {name: ((1.0 - args.alpha) * start["state_dict"][name].double() + args.alpha * tensor.double())
               .to(tensor.dtype) for name, tensor in end["state_dict"].items()}
    training = {**end.get("training", {}), "interpolation": {
        "start": weights_fingerprint(start["state_dict"]), "end": weights_fingerprint(end["state_dict"]),
        "alpha": args.alpha}}
    save_checkpoint(args.out, NetworkConfig.from_dict(end["network"]), weights, end["schedule"], training)
    print(f"wrote {args.out}: {1.0 - args.alpha:g} x {args.start} + {args.alpha:g} x {args.end}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
