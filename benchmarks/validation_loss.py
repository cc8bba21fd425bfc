"""The validation loss ``anofpdm train --validate-every`` logs, for saved networks: which one would it keep?

Uses the training defaults (or the options given) and prints the loss and the seconds per pass of each model.
Prints figures; asserts nothing. Example:

    PYTHONPATH=lib python benchmarks/validation_loss.py --data data/slices64 \\
        --models anofpdm_9307.pt,anofpdm_11513.pt   # the demo run's steps: docs/training.md
"""

from __future__ import annotations

import argparse
import time

from anofpdm.arguments import comma_ints, comma_list
from anofpdm.method.diffusion import NoiseSchedule
from anofpdm.method.model import load_model
from anofpdm.training.config import TrainConfig
from anofpdm.training.validation import ValidationLoss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="prepared slices folder with a val split")
    parser.add_argument("--models", type=comma_list, required=True, help="comma-separated model files")
    parser.add_argument("--timesteps", type=comma_ints, default=TrainConfig.validation_timesteps)
    parser.add_argument("--slices", type=int, default=TrainConfig.validation_slices)
    parser.add_argument("--seed", type=int, default=0, help="the training run's seed")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    timesteps = list(args.timesteps)
    levels = ",".join(map(str, timesteps))
    print(f"| model | iterations | validation loss (t = {levels}, {args.slices} slices) | s per pass |")
    print("|---|---|---|---|")
    for path in args.models:
        model = load_model(path, args.device)
        loss_of = ValidationLoss(args.data, model.config.sequences, timesteps, args.slices, args.seed,
                                 NoiseSchedule.from_dict(model.schedule), model.device)
        start = time.perf_counter()
        loss = loss_of(model.network.eval())
        print(f"| {path} | {model.training.get('iterations')} | {loss:.6f} | {time.perf_counter() - start:.1f} |")


if __name__ == "__main__":
    main()
