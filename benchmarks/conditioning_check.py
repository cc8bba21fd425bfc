"""Has a checkpoint learnt the class conditioning yet? A training-progress check on labelled slices.

For unhealthy slices of a prepared split, at a few noise levels t: the noise-prediction loss with the
unhealthy, healthy and null label (the same noise for all three: a conditioned network predicts unhealthy
slices best with their own label), and the average precision of the healthy-guided squared error at t alone
against the tumour pixels (brain pixels only; a map that knows nothing scores the tumour prevalence).
Prints figures; asserts nothing. Example:

    PYTHONPATH=lib python benchmarks/conditioning_check.py --model runs/cpu64/model.pt --data data/slices64
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from sklearn.metrics import average_precision_score

from anofpdm.arguments import comma_ints
from anofpdm.data.slices import SliceDataset
from anofpdm.method.diffusion import NoiseSchedule
from anofpdm.method.forward_process import guided_and_null_noise
from anofpdm.method.model import HEALTHY, NULL_LABEL, UNHEALTHY, load_model
from anofpdm.volumes.slicing import BACKGROUND


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="prepared slices folder")
    parser.add_argument("--split", default="val")
    parser.add_argument("--slices", type=int, default=32, help="seeded random unhealthy slices")
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--steps", type=comma_ints, default="25,50,100,200,300,400,500")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model = load_model(args.model)
    dataset = SliceDataset(args.data, args.split, sequences=model.config.sequences)
    masks = np.load(f"{args.data}/{args.split}_masks.npy", mmap_mode="r")
    unhealthy = np.flatnonzero(dataset.labels == UNHEALTHY)
    rng = np.random.default_rng(args.seed)
    chosen = np.sort(rng.choice(unhealthy, min(args.slices, len(unhealthy)), replace=False))
    x0 = torch.stack([dataset[int(i)][0] for i in chosen])
    truth = np.asarray(masks[chosen]) > 0
    brain = (x0 > BACKGROUND + 1e-3).any(dim=1).numpy()
    schedule = NoiseSchedule.from_dict(model.schedule)
    generator = torch.Generator().manual_seed(args.seed)
    print(f"{args.model}: iteration {model.training.get('iterations')}; {len(chosen)} unhealthy {args.split} slices; "
          f"tumour prevalence in brain {truth[brain].mean():.3f}")
    print("| t | loss, unhealthy label | loss, healthy label | loss, null label | AP of guided error at t |")
    print("|---|---|---|---|---|")
    with torch.no_grad():
        for t in args.steps:
            noise = torch.randn(x0.shape, generator=generator)
            z = schedule.add_noise(x0, noise, t)
            timesteps = torch.full((len(x0),), t)
            losses = [float(((model.network(z, timesteps, class_labels=torch.full((len(x0),), label)) - noise) ** 2)
                            .mean()) for label in (UNHEALTHY, HEALTHY, NULL_LABEL)]
            eps_guided, _ = guided_and_null_noise(model.network, z, t, args.guidance)
            error = ((schedule.predict_x0(z, eps_guided, t).clamp(-1, 1) - x0) ** 2).mean(dim=1).numpy()
            precision = average_precision_score(truth[brain], error[brain])
            print(f"| {t} | {losses[0]:.5f} | {losses[1]:.5f} | {losses[2]:.5f} | {precision:.3f} |")


if __name__ == "__main__":
    main()
