"""Baselines: DDIM decoding against an oracle network, the labels they use, and their pipeline-shaped outputs."""

import nibabel as nib
import numpy as np
import pytest
import torch

from anofpdm.evaluation.baseline_tuning import TuningGrid, tune_thresholds
from anofpdm.evaluation.baselines import (
    FLAIR_ZSCORE,
    BaselineOptions,
    FixedThreshold,
    baseline_maps,
    decoding_steps,
    finish_baseline,
    reconstruct_from_noise,
    reconstruct_guided,
    run_baseline,
)
from anofpdm.data.brats import find_cases
from anofpdm.evaluation.case_scoring import prepare_case
from anofpdm.evaluation.methods import EvaluationSettings
from anofpdm.method.diffusion import NoiseSchedule
from anofpdm.evaluation.metrics import dice
from anofpdm.method.model import HEALTHY, NULL_LABEL, LoadedModel, NetworkConfig, build_network, load_model

from conftest import make_volume_pair

LESION = (slice(15, 25), slice(15, 25), slice(4, 8))  # make_volume_pair's bright block (FLAIR and T2 doubled)


class OracleNetwork(torch.nn.Module):
    """Predicts the exact noise that separates z from the known clean slices, plus a per-label offset.

    Records (timestep, sorted labels) per call so tests can check which steps and labels a baseline used.
    """

    def __init__(self, x0: torch.Tensor, schedule: NoiseSchedule, offsets: dict[int, float]) -> None:
        super().__init__()
        self.x0, self.schedule, self.offsets = x0, schedule, offsets
        self.calls: list[tuple[int, tuple[int, ...]]] = []

    def forward(self, z, timesteps, class_labels):
        repeats = z.shape[0] // self.x0.shape[0]
        x0 = self.x0.repeat(repeats, 1, 1, 1)
        alpha_bar = self.schedule.alpha_bar[timesteps].float()[:, None, None, None]
        eps = (z - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()
        offset = torch.tensor([self.offsets[int(label)] for label in class_labels])[:, None, None, None]
        self.calls.append((int(timesteps[0]), tuple(sorted(set(class_labels.tolist())))))
        return eps + offset


@pytest.fixture
def clean():
    return torch.rand(3, 2, 8, 8, generator=torch.Generator().manual_seed(0)) * 1.8 - 0.9


def test_decoding_steps_end_at_zero():
    assert decoding_steps(100, 30) == [100, 70, 40, 10, 0]
    assert decoding_steps(90, 30) == [90, 60, 30, 0]
    assert decoding_steps(5, 1) == [5, 4, 3, 2, 1, 0]
    with pytest.raises(ValueError, match="stride"):
        decoding_steps(100, 0)


def test_reconstruction_decodes_with_the_null_label_only(clean):
    schedule = NoiseSchedule()
    # the healthy label would add 0.5 to the noise and spoil the reconstruction
    oracle = OracleNetwork(clean, schedule, {NULL_LABEL: 0.0, HEALTHY: 0.5})
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))
    reconstruction, evaluations = reconstruct_from_noise(oracle, schedule, clean, 100, 30, noise)
    torch.testing.assert_close(reconstruction, clean, atol=2e-5, rtol=0)
    assert [t for t, _ in oracle.calls] == [100, 70, 40, 10, 0]
    assert {labels for _, labels in oracle.calls} == {(NULL_LABEL,)}
    assert evaluations == 3 * 5
    with pytest.raises(ValueError, match="noise_level"):
        reconstruct_from_noise(oracle, schedule, clean, 1000, 30, noise)


def test_cfg_encodes_with_null_and_decodes_with_the_guided_noise(clean):
    schedule = NoiseSchedule()
    # with w = 2 the guided noise (1 + w) eps_h - w eps_null = eps + 3 * 0.2 - 2 * 0.3 = eps: exact only if
    # decoding uses exactly that combination
    oracle = OracleNetwork(clean, schedule, {HEALTHY: 0.2, NULL_LABEL: 0.3})
    reconstruction, evaluations = reconstruct_guided(oracle, schedule, clean, 100, 30, guidance=2.0)
    torch.testing.assert_close(reconstruction, clean, atol=2e-5, rtol=0)
    encoding, decoding = oracle.calls[:4], oracle.calls[4:]
    assert encoding == [(0, (NULL_LABEL,)), (10, (NULL_LABEL,)), (40, (NULL_LABEL,)), (70, (NULL_LABEL,))]
    assert decoding == [(t, (HEALTHY, NULL_LABEL)) for t in (100, 70, 40, 10, 0)]
    assert evaluations == 3 * (4 + 2 * 5)
    # the oracle re-aims at the clean slices at every step, so a wrong noise shows at the last one,
    # scaled by sqrt(1 - alpha_bar_0) / sqrt(alpha_bar_0) = 0.01: w = 1 leaves 2 * 0.2 - 0.3 = 0.1 -> 1e-3
    wrong, _ = reconstruct_guided(oracle, schedule, clean, 100, 30, guidance=1.0)
    assert (wrong - clean).abs().max() > 5e-4


def test_threshold_rule_validation():
    assert FixedThreshold(quantile=None, value=0.3).resolve(np.zeros((1, 2, 2)), np.ones((1, 2, 2), bool)) == 0.3
    values = np.arange(5.0).reshape(1, 1, 5)
    brain = np.array([[[True, True, True, False, False]]])
    assert FixedThreshold(quantile=0.5).resolve(values, brain) == 1.0  # median of the brain values 0, 1, 2
    with pytest.raises(ValueError, match="exactly one"):
        FixedThreshold(quantile=0.9, value=0.1)
    with pytest.raises(ValueError, match="exactly one"):
        FixedThreshold(quantile=None)
    with pytest.raises(ValueError, match="quantile"):
        FixedThreshold(quantile=99)
    with pytest.raises(ValueError, match="stride"):
        BaselineOptions(stride=0)


def test_flair_threshold_finds_the_bright_lesion():
    # the CPU preset grid (64 px of 3.75 mm) resolves the 40 mm lesion of make_volume_pair; the network is unused
    config = NetworkConfig()
    model = LoadedModel(network=build_network(config), config=config, schedule={})
    images = make_volume_pair()
    result = run_baseline("flair-threshold", model, images,
                          BaselineOptions(threshold=FixedThreshold(quantile=0.95), min_lesion_mm3=0))
    truth = np.zeros(images["flair"].shape, dtype=bool)
    truth[15:25, 15:25, 4:8] = True
    assert dice(np.asanyarray(result.mask.dataobj) > 0, truth) > 0.8
    assert result.report["network_evaluations"] == 0
    assert result.model_grid.unhealthy.sum() == 4  # the four lesion slices, nothing else survives
    # the same maps under another threshold: a fixed intensity above all brain (at most 1) finds nothing
    maps = baseline_maps("flair-threshold", model, images, BaselineOptions())
    assert maps.raw_map.max() == pytest.approx(1.0, abs=1e-3) and maps.raw_map.min() == pytest.approx(0.0, abs=1e-6)
    nothing = finish_baseline(maps, model, images, BaselineOptions(threshold=FixedThreshold(quantile=None, value=1.5)))
    assert np.asanyarray(nothing.mask.dataobj).sum() == 0 and not nothing.model_grid.unhealthy.any()
    with pytest.raises(ValueError, match="unknown baseline"):
        run_baseline("magic", model, images)


@pytest.mark.parametrize("method, per_slice_evaluations", [("anoddpm-reconstruction", 3), ("cfg-ddim", 2 + 2 * 3)])
def test_network_baselines_have_the_pipeline_form(tiny_model_path, method, per_slice_evaluations):
    model = load_model(tiny_model_path)
    images = make_volume_pair()
    options = BaselineOptions(noise_level=20, stride=10, min_lesion_mm3=0, batch_size=4)
    result = run_baseline(method, model, images, options)
    grid = result.model_grid
    n, size = 10, model.config.image_size  # make_volume_pair's brain spans 10 slices
    assert grid.raw_map.shape == (n, size, size) and grid.slices.shape == (n, 2, size, size)
    assert grid.thresholds.shape == (n,) and np.all(grid.thresholds == grid.thresholds[0])
    assert result.report["network_evaluations"] == n * per_slice_evaluations  # steps 20, 10, 0
    assert result.mask.shape == images["flair"].shape
    np.testing.assert_array_equal(result.mask.affine, images["flair"].affine)
    np.testing.assert_array_equal(grid.unhealthy, [bool(np.asanyarray(result.mask.dataobj)[:, :, z].any())
                                                   for z in range(1, 11)])
    again = run_baseline(method, model, images, options)
    np.testing.assert_array_equal(again.model_grid.raw_map, grid.raw_map)  # seeded


def _cpu_grid_model() -> LoadedModel:
    """The CPU preset's grid (64 px of 3.75 mm, which resolves make_volume_pair's 40 mm lesion); no network is used."""
    config = NetworkConfig()
    return LoadedModel(network=build_network(config), config=config, schedule={})


def test_flair_zscore_finds_the_bright_lesion_and_leaves_a_healthy_volume_empty():
    model = _cpu_grid_model()
    # the brain's FLAIR is uniform in [100, 110): median 105, MAD 2.5, robust SD 3.7, so no brain voxel lies more
    # than 1.4 SD from the median; the lesion, at twice that, lies about 27 SD above it
    options = BaselineOptions(threshold=FixedThreshold(quantile=None, value=3.0), min_lesion_mm3=0)
    images = make_volume_pair()
    result = run_baseline(FLAIR_ZSCORE, model, images, options)
    truth = np.zeros(images["flair"].shape, dtype=bool)
    truth[LESION] = True
    assert dice(np.asanyarray(result.mask.dataobj) > 0, truth) > 0.8
    assert result.model_grid.unhealthy.sum() == 4 and result.report["network_evaluations"] == 0
    assert result.report["settings"]["threshold_rule"] == {"quantile": None, "value": 3.0}
    # the brain's statistics, taken on the input FLAIR (not the slices, clipped at the 99th percentile)
    assert 104 < result.report["settings"]["brain_flair_median"] < 106
    assert 3.3 < result.report["settings"]["brain_flair_spread"] < 4.1
    healthy = run_baseline(FLAIR_ZSCORE, model, make_volume_pair(seed=1, lesion=False), options)
    assert np.asanyarray(healthy.mask.dataobj).sum() == 0 and not healthy.model_grid.unhealthy.any()
    # the default rule is a z-score threshold, not the quantile rule of the other baselines
    assert run_baseline(FLAIR_ZSCORE, model, images).report["settings"]["threshold_rule"]["quantile"] is None


def test_flair_zscore_on_bias_corrected_sequences_leaves_a_brightened_healthy_side_alone():
    """A healthy volume under a smooth field flat in its middle and rising at the +x edge (exp(0.8 u^3), u from -1 to
    1 across the grid): the z-score as defined masks that edge; on N4-corrected sequences, as the app sees them,
    nothing."""
    model = _cpu_grid_model()
    images = make_volume_pair(seed=1, lesion=False)
    field = np.exp(0.8 * np.linspace(-1, 1, 40) ** 3)[:, None, None].astype(np.float32)
    for name in ("flair", "t2"):
        images[name] = nib.Nifti1Image(np.asanyarray(images[name].dataobj) * field, images[name].affine)
    rule = FixedThreshold(quantile=None, value=3.0)
    as_defined = run_baseline(FLAIR_ZSCORE, model, images, BaselineOptions(threshold=rule, min_lesion_mm3=0))
    assert BaselineOptions().bias_correction == "none" and np.asanyarray(as_defined.mask.dataobj).sum() > 100
    corrected = run_baseline(FLAIR_ZSCORE, model, images,
                             BaselineOptions(threshold=rule, min_lesion_mm3=0, bias_correction="n4"))
    assert np.asanyarray(corrected.mask.dataobj).sum() == 0
    with pytest.raises(ValueError, match="bias_correction must be one of"):
        BaselineOptions(bias_correction="n3")
    assert EvaluationSettings(baseline_bias_correction="n4").baseline_options(FLAIR_ZSCORE).bias_correction == "n4"


def _validation_case(root, case_id: str) -> None:
    """make_volume_pair's tumour (truth) with two bright regions beside it that are not tumour: a large one
    moderately bright (B: 5 robust SD above the brain's median on the input grid) and a small one as bright as the
    tumour (C: 4 x 4 x 3 voxels, 3.84 mL at most)."""
    images = make_volume_pair(seed=4)
    flair, t2 = (np.asanyarray(images[name].dataobj).copy() for name in ("flair", "t2"))
    flair[26:32, 28:36, 2:9] = 105 + 5 * 1.4826 * 2.5  # B: 20 mL
    flair[8:12, 30:34, 2:5] *= 2.0  # C
    folder = root / case_id
    folder.mkdir(parents=True)
    for name, data in (("flair", flair), ("t2", t2)):
        nib.save(nib.Nifti1Image(data, images["flair"].affine), folder / f"{case_id}_{name}.nii.gz")
    seg = np.zeros(flair.shape, dtype=np.uint8)
    seg[LESION] = 2
    nib.save(nib.Nifti1Image(seg, images["flair"].affine), folder / f"{case_id}_seg.nii.gz")


def test_tuning_picks_the_zscore_and_lesion_size_that_keep_only_the_tumour(tmp_path):
    _validation_case(tmp_path, "BraTS2021_00009")
    model = _cpu_grid_model()
    case = prepare_case(find_cases(tmp_path)[0], model.config)
    # by construction: z* = 2 also masks B, 40 masks nothing (the tumour is about 27 SD up); z* = 10 keeps the tumour
    # and C, and only a minimum size between C (<= 3.84 mL) and the tumour (32 mL) leaves the tumour alone
    grid = TuningGrid(quantiles=(0.5,), zscores=(40.0, 2.0, 10.0), min_lesion_mm3=(8000.0, 250.0))
    settings = EvaluationSettings(min_lesion_mm3=0)
    tuned = tune_thresholds(model, [case], [FLAIR_ZSCORE, "anofpdm-volume-fast"], settings, grid)
    assert set(tuned) == {FLAIR_ZSCORE}
    chosen = tuned[FLAIR_ZSCORE]
    assert chosen["threshold"] == {"quantile": None, "value": 10.0} and chosen["min_lesion_mm3"] == 8000.0
    scores = {(row["value"], row["min_lesion_mm3"]): row["dice"] for row in chosen["validation_dice"]}
    assert len(scores) == 6 and scores[(40.0, 250.0)] == 0.0
    assert scores[(10.0, 8000.0)] > scores[(10.0, 250.0)] and scores[(10.0, 8000.0)] > scores[(2.0, 8000.0)]
