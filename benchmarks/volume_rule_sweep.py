"""How the per-volume decision rule's settings move the figures (#30): map_z, flair_quantile and t2_quantile
of ``VolumeRule``, the periventricular findings left out or kept (``InferenceOptions.periventricular_findings``)
and the rule's FLAIR gate reading the FLAIR after N4 (``--gate-bias-correction n4``; an experiment, not an option
of the app: docs/evaluation.md, "The rule's FLAIR gate after N4").

Each case's forward process runs once (fast mode unless ``--mode``); every rule setting is then decided and scored
by the pipeline and the evaluation's own scoring (``segment_volume`` with the cached forward process,
``anofpdm.evaluation.case_scoring.score_result``). Prints one row per setting: 3-D Dice over tumour cases, healthy
volumes'
false-positive mL and how many were called healthy, and the slice AUROC of the rule's slice score. Pick settings on
a validation split, never on the test cases you report.

    PYTHONPATH=lib python benchmarks/volume_rule_sweep.py --model model/anofpdm.pt --data data/synth80 \\
        --prepared data/slices64s --split val --map-z 4,6,8,10,12,16 --cache runs/sweep_val

``--cache`` keeps each case's forward process (pickles, for this benchmark only), so settings can be compared again
without the network. ``--min-brain-fraction 0,0.1`` also scores leaving out the slices with little brain
(``InferenceOptions.min_brain_fraction``) from the same forward process: exactly what the option gives, since a
visited slice's statistics do not depend on the other slices (``anofpdm.method.forward_process.run_on_slices``).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from anofpdm.arguments import comma_floats, comma_list
from anofpdm.evaluation.case_scoring import EvaluationCase, SliceProtocol, score_result
from anofpdm.method.decisions import VolumeRule
from anofpdm.method.model import LoadedModel, load_model
from anofpdm.method.forward_process import SliceStatistics
from anofpdm.method.pipeline import ForwardOutputs, InferenceOptions, segment_volume
from anofpdm.volumes.bias_field import correct_bias_fields
from anofpdm.volumes.checks import as_3d
from anofpdm.volumes.slicing import image_like, slices_with_brain, to_model_slices
from anofpdm.runtime import default_device
from cases import add_forward_arguments, cached, forward_cases

GATE_BIAS_CORRECTIONS = ("none", "n4")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_forward_arguments(parser)
    parser.add_argument("--map-z", type=comma_floats, default=(VolumeRule.map_z,))
    parser.add_argument("--flair-quantile", type=comma_floats, default=(VolumeRule.flair_quantile,))
    parser.add_argument("--t2-quantile", type=comma_floats, default=(VolumeRule.t2_quantile,))
    parser.add_argument("--min-brain-fraction", type=comma_floats, default=(InferenceOptions.min_brain_fraction,))
    parser.add_argument("--periventricular-findings", type=comma_list,
                        default=(InferenceOptions.periventricular_findings,))
    parser.add_argument("--gate-bias-correction", type=comma_list, default=("none",),
                        help="none and/or n4: the rule's FLAIR gate reads the FLAIR divided by its N4 bias field")
    args = parser.parse_args()
    if unknown := set(args.gate_bias_correction) - set(GATE_BIAS_CORRECTIONS):
        parser.error(f"--gate-bias-correction takes {', '.join(GATE_BIAS_CORRECTIONS)}, got {', '.join(unknown)}")

    model = load_model(args.model, device=args.device or default_device())
    options = InferenceOptions(mode=args.mode, batch_size=args.batch_size, decision_rule="volume")
    rules = [(VolumeRule(map_z=z, flair_quantile=q, t2_quantile=t), f, p, b) for z in args.map_z
             for q in args.flair_quantile for t in args.t2_quantile for f in args.min_brain_fraction
             for p in args.periventricular_findings for b in args.gate_bias_correction]
    rows: dict[tuple[VolumeRule, float, str, str], list[tuple[float, float, float, float | None]]] = {
        rule: [] for rule in rules}
    for case, outputs in forward_cases(args, model, options):
        read = {b: gate_corrected(model, case, outputs, b, args.cache) for b in args.gate_bias_correction}
        for rule, fraction, periventricular, bias in rules:
            result = segment_volume(model, case.images, replace(options, periventricular_findings=periventricular),
                                    forward_outputs=left_out(read[bias], fraction), volume_rule=rule)
            scored = score_result(result, case, SliceProtocol())
            volume = scored["volume"]
            rows[rule, fraction, periventricular, bias].append((volume["truth_ml"], volume["dice"],
                                                                volume["predicted_ml"], scored["slice"]["slice_auroc"]))
        print(f"{case.case_id} done", flush=True)

    print("map_z | flair_quantile | t2_quantile | min brain fraction | periventricular findings | gate bias "
          "correction | 3-D Dice | healthy FP (mL) | called healthy | slice AUROC | per tumour case")
    for (rule, fraction, periventricular, bias), figures in rows.items():
        tumour = [f for f in figures if f[0] > 0]
        healthy = [f for f in figures if f[0] == 0]
        aurocs = [f[3] for f in tumour if f[3] is not None]
        print(f"{rule.map_z:g} | {rule.flair_quantile:g} | {rule.t2_quantile:g} | {fraction:g} | {periventricular} | "
              f"{bias} | "
              f"{np.mean([f[1] for f in tumour]):.3f} | "
              f"{np.mean([f[2] for f in healthy]) if healthy else float('nan'):.2f} | "
              f"{sum(f[2] == 0 for f in healthy)} of {len(healthy)} | "
              f"{np.mean(aurocs) if aurocs else float('nan'):.3f} | " + " ".join(f"{f[1]:.2f}" for f in tumour))


def gate_corrected(model: LoadedModel, case: EvaluationCase, outputs: ForwardOutputs, gate_bias_correction: str,
                   cache: Path | None) -> ForwardOutputs:
    """``outputs`` with the rule's FLAIR gate reading the FLAIR as it came ("none") or divided by its N4 bias field
    ("n4"), the forward process (the network's input and maps) unchanged: only the gate reads the slices of
    ``ForwardOutputs`` once the maps exist (the corrected FLAIR kept in ``cache``)."""
    if gate_bias_correction == "none":
        return outputs
    flair_name = model.config.sequences[0]
    # the FLAIR as the forward process had it: the brain it found (a head's extracted brain) and nothing else
    brain_only = {name: image_like(image, np.where(outputs.brain, as_3d(name, image), 0), np.float32)
                  for name, image in case.images.items()}

    def corrected_flair() -> nib.Nifti1Image:
        return correct_bias_fields(brain_only, (flair_name,), "n4")[0][flair_name]

    flair = cached(None if cache is None else cache / f"{case.case_id}.n4-flair.pkl", corrected_flair)
    config = model.config
    slices, _, _ = to_model_slices({**brain_only, flair_name: flair}, config.sequences, config.image_size,
                                   config.field_of_view_mm, landmarks=config.landmarks)
    slices[:, 1:] = outputs.slices[:, 1:]  # the other sequences exactly as the network saw them (a registered T2)
    return replace(outputs, slices=slices)


def left_out(outputs: ForwardOutputs, min_brain_fraction: float) -> ForwardOutputs:
    """``outputs`` as if the slices with less brain than ``min_brain_fraction`` had not been run."""
    visited = slices_with_brain(outputs.slices, min_brain_fraction)
    stats, rows = outputs.stats, torch.from_numpy(visited)
    kept = SliceStatistics(stats.scores[rows], stats.anomaly_maps[rows], stats.end_step_maps[rows],
                           stats.end_steps[rows], stats.max_divergence[rows], stats.network_evaluations,
                           stats.visited_steps)
    return replace(outputs, stats=kept.scattered(visited), visited=visited)


if __name__ == "__main__":
    main()
