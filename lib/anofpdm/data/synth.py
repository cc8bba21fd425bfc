"""Synthetic BraTS-format cases on real anatomy (the MNI152 2009a template shipped with nilearn).

Each case warps the template's tissue maps (grey matter, white matter, CSF = brain minus both) with a
small random affine and a smooth deformation, optionally grows a tumour (necrotic core 1, oedema 2,
enhancing rim 4) with mild mass effect, adds tumour-like but benign FLAIR findings (by default periventricular
caps and small white-matter hyperintensities; with ``benign_findings="clinical"`` a Fazekas-graded small-vessel
burden and old lacunes, with a truth map of their own) and renders FLAIR, T1, T1ce and T2 with per-case contrast jitter,
a bias field, slight blur and Rician noise. The output is on the BraTS grid (240 x 240 x 155, 1 mm,
skull-stripped: exactly 0 outside the brain) in the BraTS21 layout, plus a MONAI Label studies folder.
With heads on, the rest of the head is grown around the brain (``anofpdm.data.heads``) and each case also
carries its truth brain mask, for brain extraction.

The images are synthetic: they exercise the pipeline end to end, they do not replace BraTS. The ranges of
pose, anatomy and acquisition are a ``Domain`` (``anofpdm.data.domains``): the training domain, or the shifted
test domain beyond it.

One module over 500 lines on purpose: it is one generator, whose stages (template, pose and deformation,
tumour, benign findings, rendering, writing) share private dataclasses and the constants at its top; the
preview image lives in ``anofpdm.data.preview``.
"""

from __future__ import annotations

import functools
import gzip
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from anofpdm.data import heads
from anofpdm.data.brats import SEQUENCES
from anofpdm.data.domains import DOMAINS, TRAINING, Domain, reslice, reslice_labels
from anofpdm.parallel import ordered_map

__all__ = [
    "BRATS_SHAPE",
    "SyntheticCase",
    "brats_affine",
    "case_seed",
    "is_healthy_index",
    "case_name",
    "synthesize_case",
    "write_case",
    "generate_cases",
    "write_demo_studies",
]

ProgressFn = Callable[[int, int], None]

BRATS_SHAPE = (240, 240, 155)
CASE_PREFIX = "SYN_"
CASE_DIGITS = 5
STUDIES_DIR = "studies"
STUDIES_T2_DIR = "t2"
MANIFEST_NAME = "manifest.json"
TRUTH_DIR = "truth"
BRAIN_MASK_SUFFIX = "brainmask"  # <CASE>_brainmask.nii.gz: the truth brain mask of a case with heads
HEAD_STREAM = 39  # the head's random stream is SeedSequence([case seed, HEAD_STREAM]): the brain's is untouched
DATASET_COMPRESS_LEVEL = 1  # gzip level of generated data sets (fast)
DEMO_COMPRESS_LEVEL = 9  # the committed demo is written once: smallest files
DEMO_HEAD_GRID = ((160, 160, 104), 1.5)  # the BraTS field of view at 1.5 mm: a demo head study of ~2 MB a volume
LABEL_NECROTIC, LABEL_OEDEMA, LABEL_ENHANCING = 1, 2, 4
INT16_MAX = 32767
MIN_GRID = 8
MEMBERSHIP_THRESHOLD = 0.5  # soft brain / lesion maps -> masks and labels
LPS_FLIPS = np.array([-1.0, -1.0, 1.0])  # RAS direction of each LPS voxel axis

# --- template geometry -------------------------------------------------------------------------
ATLAS_CHANNELS = ("gm", "wm", "brain", "periventricular", "t1")  # channel order of the warped template
VENTRICLE_MIN_DEPTH_MM = 12.0  # CSF deeper than this inside the brain counts as ventricle
PERIVENTRICULAR_SIGMA_MM = 2.5
PERIVENTRICULAR_BAND_GAIN = 2.0  # the blurred ventricle mask is scaled by this, then clipped to 1
TUMOUR_SITE_MIN_DEPTH_MM = 18.0
TUMOUR_SITE_MIN_WM = 0.6
TUMOUR_SITE_MIN_Z_MM = -10.0  # MNI z: above the cerebellum and brainstem
TUMOUR_SITES_KEPT = 4000
SURFACE_SITE_DEPTH_MM = (3.0, 9.0)  # "surface" tumours grow from this deep under the brain's surface (at the cortex)
TUMOUR_SITES = ("deep", "surface")  # where tumour centres are drawn: deep white matter (the default) or the cortex
VENTRICLE_EXPANSION_WIDTH_MM = 28.0  # Gaussian reach of a domain's ventricle enlargement
ATROPHY_REACH_MM = 1.5  # grey matter within about this of CSF can be lost to it
ATROPHY_CSF_GAIN = 3.0
ATROPHY_CONTROL_MM = 8.0  # scale of the patchy pattern of sulcal widening

# --- pose (its ranges are the domain's: anofpdm.data.domains) ------------------------------------
CROP_MARGIN_MM = 10.0
COORDINATE_STEP = 2  # the smooth voxel-to-template map is computed every this many voxels

# --- tumour ---------------------------------------------------------------------------------------
CORE_FRACTION = (0.45, 0.8)  # core radius / whole radius
NECROSIS_FRACTION = (0.45, 0.8)  # necrosis radius / core radius
NO_NECROSIS_PROBABILITY = 0.25
NON_ENHANCING_PROBABILITY = 0.15
AXIS_RATIO_RANGE = (0.75, 1.3)
IRREGULARITY = (0.12, 0.3)  # smooth-noise amplitude added to the normalised radius
IRREGULARITY_CONTROL_MM = 6.0
OEDEMA_WM_GAIN = 0.6  # oedema reach shrinks by this fraction outside white matter (it spares cortex)
OEDEMA_NOISE = 0.25
EDGE_SOFTNESS = 0.06  # sigmoid width at label edges, in units of the normalised radius
MASS_EFFECT_MAX = 0.45  # largest fractional inward pull of the template at the tumour centre
MASS_EFFECT_RANDOM = (0.3, 1.0)  # per-case factor on MASS_EFFECT_MAX
MASS_EFFECT_REFERENCE_MM = 30.0  # tumours this large get the full mass effect
MASS_EFFECT_WIDTH = 1.5  # Gaussian width of the displacement, in core radii
OEDEMA_EDGE_FACTOR = 2.0  # oedema fades over this many times the core's edge width
HETEROGENEITY_CONTROL_MM = 4.0
TUMOUR_BOX_RADII = 2.6  # the tumour fields are computed within this many nominal radii

# --- benign FLAIR findings ------------------------------------------------------------------------
PERIVENTRICULAR_PROBABILITY = 0.5
PERIVENTRICULAR_GAIN = (0.25, 0.7)
WMH_PROBABILITY = 0.5
WMH_MEAN_COUNT = 4.0
WMH_SIGMA_MM = (1.0, 2.2)
WMH_GAIN = (0.5, 1.0)
WMH_SITE_MIN_WM = 0.7
PERIVENTRICULAR_CONTROL_MM = 30.0  # scale of the pattern that picks caps out of the band
PERIVENTRICULAR_PATTERN = (0.6, 0.6)  # pattern = clip(offset + scale * unit smooth noise, 0, 1)
CONTROL_SMOOTHING = 1.0  # Gaussian sigma (control-grid cells) applied to every random field

# --- benign FLAIR findings, the clinical model (``benign_findings="clinical"``) ---------------------------
# A per-case small-vessel burden as Fazekas grades (Fazekas et al. 1987, AJR 149:351): periventricular 0 none,
# 1 caps or a pencil-thin lining, 2 a smooth halo, 3 irregular, reaching into the deep white matter; deep 0 none,
# 1 punctate foci, 2 beginning confluence, 3 large confluent areas. Frequencies chosen (not fitted) for the
# age of glioma patients (median about 55-65 years, Ostrom et al., CBTRUS reports): mostly mild, as in community
# samples of that age and older (Rotterdam Scan Study, de Leeuw et al. 2001, JNNP 70:9, 60-90 years:
# periventricular lesions in 80 %, subcortical in 92 %, severe grades rare; Wen & Sachdev 2004, NeuroImage 22:144,
# 60-64 years: nearly all have some, mostly punctate). Silent lacunar infarcts in 8-28 % of older adults
# (Vermeer et al. 2007, Lancet Neurol 6:611).
BENIGN_MODELS = ("basic", "clinical")  # basic: the caps and blobs above (every recorded figure); clinical: below
BENIGN_STREAM = 41  # the clinical findings' random stream is SeedSequence([case seed, BENIGN_STREAM]) (issue #41)
BENIGN_SUFFIX = "benign"  # <CASE>_benign.nii.gz: the truth map of the clinical findings (uint8, BENIGN_CODES)
BENIGN_CODES = {  # label of each finding type in the truth map (0: none); a later code wins where two overlap
    "periventricular_halo": 1, "periventricular_confluent": 2, "periventricular_lining": 3, "periventricular_cap": 4,
    "deep_punctate": 5, "deep_confluent": 6, "lacune": 7, "lacune_gliosis": 8,
}
FAZEKAS_PERIVENTRICULAR = (0.2, 0.45, 0.25, 0.1)  # probability of grade 0, 1, 2, 3
FAZEKAS_DEEP_DROP = 0.5  # deep grade = periventricular grade, one lower with this probability (deep <= PV)
LATERAL_VENTRICLE_MIN_DEPTH_MM = 16.0  # template CSF this deep splits into the two lateral ventricles
LATERAL_VENTRICLE_MIN_ML = 2.0  # smaller deep CSF components (sulci, third ventricle) are not lateral ventricles
LATERAL_VENTRICLE_MIN_OFFSET_MM = 5.0  # a lateral ventricle's centroid lies at least this far from the midline
HORN_TIP_SPAN_MM = 3.0  # a horn's tip: its ventricle's voxels within this of the most anterior / posterior one
DISTANCE_CLIP_MM = 40.0  # template distance maps are clipped here (findings reach far less)
BENIGN_EDGE_MM = 0.8  # sigmoid width of band and cap edges
LINING_PROBABILITY = 0.6  # grade 1: a pencil-thin lining besides the caps
LINING_MM = (1.5, 3.0)
HALO_MM = (3.0, 6.0)  # grade >= 2: smooth halo thickness where it is full
CONFLUENT_PV_MM = (6.0, 12.0)  # grade 3: reach of the irregular periventricular lesions into the white matter
BAND_COVERAGE = (0.75, 0.4, 0.3)  # a band's thickness scales by clip(offset + scale * unit smooth noise, low, 1)
BAND_COVERAGE_CONTROL_MM = 25.0
BAND_IRREGULARITY = (0.2, 0.5)  # relative fine variation of the confluent lesions' reach (irregular edges)
BAND_IRREGULARITY_CONTROL_MM = 8.0
CAP_RADIUS_MM = (4.0, 9.0)  # reach of a cap from its horn's tip
CAP_DEPTH_MM = (3.0, 7.0)  # and from the ventricle's wall
OCCIPITAL_CAP_PROBABILITY = 0.5  # frontal caps always come with grade >= 1, occipital ones with this probability
CAP_GAIN = (0.35, 0.8)  # the findings map's value, times CLINICAL_HYPERINTENSITY_GAIN (1: about as bright as oedema)
LINING_GAIN = (0.3, 0.6)
HALO_GAIN = (0.35, 0.75)
CONFLUENT_GAIN = (0.6, 1.0)
DEEP_MIN_VENTRICLE_MM = 10.0  # deep white matter lies at least this far from the lateral ventricles
PUNCTATE_MEAN_COUNT = (0.0, 3.0, 5.0, 6.0)  # per deep grade, Poisson mean of the punctate foci beyond the first
PUNCTATE_SIGMA_MM = (0.8, 2.0)
PUNCTATE_GAIN = (0.45, 1.0)
CONFLUENT_PATCHES = ((0, 0), (0, 0), (1, 3), (2, 4))  # per deep grade, (low, high) count of confluent patches
CONFLUENT_PATCH_MM = ((0.0, 0.0), (0.0, 0.0), (2.5, 4.5), (4.5, 8.0))  # per deep grade, patch blob size (sigma)
CONFLUENT_BLOBS = (3, 7)  # blobs merged into one patch, scattered over about a patch size
LACUNE_PROBABILITY = 0.15
LACUNE_EXTRA_MEAN = 0.3  # Poisson mean of further lacunes in a case that has one
LACUNE_RADIUS_MM = (1.5, 6.0)  # 3-12 mm cavities
LACUNE_GLIOSIS_MM = (1.5, 3.0)  # the FLAIR-bright gliotic rim around the CSF-filled cavity
LACUNE_GLIOSIS_GAIN = (0.5, 0.9)
LACUNE_GREY_SHARE = 0.6  # share of lacunes in the deep grey nuclei (the rest in deep white matter)
LACUNE_SITE_MIN_DEPTH_MM = (25.0, 15.0)  # deep grey, deep white matter: template depth under the brain's surface
LACUNE_SITE_MIN_TISSUE = 0.6
BENIGN_TUMOUR_LEVEL = 0.05  # no finding is labelled where the soft whole-tumour map exceeds this

# --- contrast -------------------------------------------------------------------------------------
# Relative signal of each tissue per sequence (white matter of FLAIR around 0.75).
HEALTHY_TISSUES = ("csf", "gm", "wm")
CONTRAST_TISSUES = ("csf", "gm", "wm", "oedema", "enhancing", "necrosis", "non_enhancing")
CONTRAST = {
    sequence: dict(zip(CONTRAST_TISSUES, values))
    for sequence, values in {
        "flair": (0.12, 0.95, 0.72, 1.45, 1.25, 0.85, 1.5),
        "t1": (0.28, 0.62, 0.92, 0.55, 0.62, 0.32, 0.5),
        "t1ce": (0.28, 0.62, 0.92, 0.55, 1.55, 0.3, 0.52),
        "t2": (2.1, 1.05, 0.72, 1.55, 1.25, 1.9, 1.6),
    }.items()
}
HYPERINTENSITY_GAIN = {"flair": 1.0, "t1": -0.15, "t1ce": -0.15, "t2": 0.6}  # basic benign findings
# Clinical findings: white-matter lesions and gliosis hold more water, bright on T2 as on FLAIR (at full gain about
# as bright as oedema on both, above grey matter on T2), mildly dark on T1.
CLINICAL_HYPERINTENSITY_GAIN = {"flair": 1.0, "t1": -0.2, "t1ce": -0.2, "t2": 1.1}
TEMPLATE_TEXTURE_SEQUENCES = ("t1", "t1ce")
TEMPLATE_T1_WEIGHT = 0.5  # T1 and T1ce blend the template's own T1 texture with the tissue model
SCANNER_SCALE = {"flair": 120.0, "t1": 150.0, "t1ce": 160.0, "t2": 110.0}  # int16 units per relative signal
LESION_HETEROGENEITY = 0.15
BLUR_TRUNCATE = 2.5  # kernel half-width in sigmas


@dataclass(frozen=True)
class _Atlas:
    """The template channels (MNI voxel = 1 mm RAS), brain centre and box, and tumour sites."""

    channels: torch.Tensor  # 1 x C x X x Y x Z, channels-last (faster trilinear sampling)
    centre: np.ndarray
    bbox: np.ndarray  # 2 x 3: first and last voxel of the brain
    tumour_sites: np.ndarray  # N x 3 voxel indices
    surface_sites: np.ndarray  # M x 3 voxel indices just under the brain's surface
    ventricle_centre: np.ndarray  # voxel centroid of the ventricles


@dataclass(frozen=True)
class SyntheticCase:
    """One generated case: int16 images (sequence -> array), uint8 seg, affine and description.

    With heads, the images hold the whole head and ``brain_mask`` (uint8, 1 in the brain) is where the
    skull-stripped images are nonzero; without, the images are skull-stripped and ``brain_mask`` is None.
    ``benign`` is the truth map of the clinical benign findings (uint8, ``BENIGN_CODES``), None with the basic ones.
    """

    images: dict[str, np.ndarray]
    seg: np.ndarray
    affine: np.ndarray
    info: dict[str, Any]
    brain_mask: np.ndarray | None = None
    benign: np.ndarray | None = None


def brats_affine(shape: Sequence[int] = BRATS_SHAPE, voxel_mm: float = 1.0) -> np.ndarray:
    """The LPS affine BraTS files carry: diag(-1, -1, 1) with the y origin on the last row."""
    affine = np.diag([-voxel_mm, -voxel_mm, voxel_mm, 1.0])
    affine[1, 3] = (shape[1] - 1) * voxel_mm
    return affine


def case_seed(seed: int, index: int) -> int:
    """Seed of case ``index`` derived from the run seed (independent of the number of cases)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got {seed} and {index}")
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def is_healthy_index(index: int, healthy_fraction: float) -> bool:
    """Whether case ``index`` is healthy: evenly spread so that any prefix holds the right fraction."""
    if not 0.0 <= healthy_fraction <= 1.0:
        raise ValueError(f"healthy_fraction must be in [0, 1], got {healthy_fraction}")
    return int((index + 1) * healthy_fraction) > int(index * healthy_fraction)


# --- template ---------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _atlas() -> _Atlas:
    """Load the MNI152 2009a maps that ship inside nilearn's wheel (no download) once per process."""
    from nilearn import datasets

    gm = datasets.load_mni152_gm_template(resolution=1).get_fdata(dtype=np.float32)
    wm = datasets.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32)
    brain = datasets.load_mni152_brain_mask(resolution=1).get_fdata(dtype=np.float32)
    template = datasets.load_mni152_template(resolution=1)
    t1 = template.get_fdata(dtype=np.float32) * brain
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    depth = ndimage.distance_transform_edt(brain > MEMBERSHIP_THRESHOLD)
    ventricles = ((csf > MEMBERSHIP_THRESHOLD) & (depth > VENTRICLE_MIN_DEPTH_MM)).astype(np.float32)
    band = np.clip(PERIVENTRICULAR_BAND_GAIN * ndimage.gaussian_filter(ventricles, PERIVENTRICULAR_SIGMA_MM), 0.0, 1.0)
    periventricular = band * (1.0 - ventricles) * wm
    z_mm = template.affine[2, 3] + np.arange(brain.shape[2])
    above = (z_mm > TUMOUR_SITE_MIN_Z_MM)[None, None, :]
    sites = np.argwhere((wm > TUMOUR_SITE_MIN_WM) & (depth > TUMOUR_SITE_MIN_DEPTH_MM) & above)
    keep = np.linspace(0, len(sites) - 1, min(TUMOUR_SITES_KEPT, len(sites))).astype(int)
    shallow = (depth >= SURFACE_SITE_DEPTH_MM[0]) & (depth <= SURFACE_SITE_DEPTH_MM[1])
    surface = np.argwhere(shallow & (brain > MEMBERSHIP_THRESHOLD) & above)
    surface = surface[np.linspace(0, len(surface) - 1, min(TUMOUR_SITES_KEPT, len(surface))).astype(int)]
    inside = np.argwhere(brain > MEMBERSHIP_THRESHOLD)
    bbox = np.stack([inside.min(0), inside.max(0)]).astype(np.float64)
    maps = {"gm": gm, "wm": wm, "brain": brain, "periventricular": periventricular, "t1": t1}
    stacked = np.ascontiguousarray(np.stack([maps[name] for name in ATLAS_CHANNELS]), dtype=np.float32)
    channels = torch.from_numpy(stacked)[None].contiguous(memory_format=torch.channels_last_3d)
    return _Atlas(channels, bbox.mean(0), bbox, sites[keep], surface, np.argwhere(ventricles > 0).mean(0))


# --- random fields ------------------------------------------------------------------------------------
def _smooth_noise(rng: np.random.Generator, shape: Sequence[int], control_vox: float, channels: int = 1) -> np.ndarray:
    """Unit-variance smooth noise (channels x shape): smoothed control points, trilinear upsampling."""
    control = tuple(max(2, int(np.ceil(n / control_vox)) + 1) for n in shape)
    raw = rng.standard_normal((channels, *control)).astype(np.float32)
    raw = ndimage.gaussian_filter(raw, (0, *(CONTROL_SMOOTHING,) * len(control)), mode="nearest")
    raw /= max(float(raw.std()), np.finfo(np.float32).eps)
    up = F.interpolate(torch.from_numpy(raw)[None], size=tuple(shape), mode="trilinear", align_corners=True)
    return up[0].numpy()


def _rotation(rng: np.random.Generator, domain: Domain) -> np.ndarray:
    """A random 3-D rotation matrix: normal angles per axis, clipped, as the domain sets them."""
    sd, limit = domain.rotation_sd_deg, domain.rotation_max_deg
    angles = np.deg2rad(np.clip(rng.normal(0.0, sd, 3), -limit, limit))
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(*bounds))


# --- geometry -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Pose:
    """Target RAS millimetres (from the grid centre) -> template voxel: ``centre + matrix @ d + shift``."""

    matrix: np.ndarray
    shift: np.ndarray

    def to_target(self, atlas_points: np.ndarray, centre: np.ndarray) -> np.ndarray:
        """Template voxels (N x 3) -> target millimetres, ignoring the smooth deformation."""
        return np.linalg.solve(self.matrix, (atlas_points - centre - self.shift).T).T


def _draw_pose(rng: np.random.Generator, domain: Domain) -> _Pose:
    zoom = _uniform(rng, domain.zoom_range) * rng.uniform(*domain.anisotropy_range, 3)
    matrix = _rotation(rng, domain) @ np.diag(1.0 / zoom)
    return _Pose(matrix, rng.uniform(-domain.translation_mm, domain.translation_mm, 3))


def _grid_mm(shape: Sequence[int], voxel_mm: float) -> list[np.ndarray]:
    """Per-axis RAS millimetre coordinates (from the grid centre) of an LPS grid's voxel indices."""
    return [LPS_FLIPS[a] * (np.arange(n) - (n - 1) / 2.0) * voxel_mm for a, n in enumerate(shape)]


def _crop_box(atlas: _Atlas, pose: _Pose, shape: Sequence[int], voxel_mm: float) -> tuple[slice, slice, slice]:
    """Target voxel box holding the warped brain (with a margin for deformation and mass effect)."""
    corners = np.array(np.meshgrid(*atlas.bbox.T, indexing="ij")).reshape(3, -1).T
    mm = pose.to_target(corners, atlas.centre)
    index = LPS_FLIPS * mm / voxel_mm + (np.asarray(shape) - 1) / 2.0
    margin = CROP_MARGIN_MM / voxel_mm
    low = np.maximum(np.floor(index.min(0) - margin), 0).astype(int)
    high = np.minimum(np.ceil(index.max(0) + margin) + 1, shape).astype(int)
    return tuple(slice(int(a), int(b)) for a, b in zip(low, high))


@dataclass(frozen=True)
class _TumourPlan:
    """Where and how big the tumour is (target RAS millimetres) and its shape parameters."""

    centre_mm: np.ndarray
    radius_mm: float
    core_fraction: float
    necrosis_fraction: float  # 0: no necrotic core
    enhancing: bool
    shape_matrix: np.ndarray  # maps offsets (mm) to normalised anisotropic offsets
    irregularity: float
    mass_effect: float


def _plan_tumour(
    rng: np.random.Generator, atlas: _Atlas, pose: _Pose, tumour_volume_ml: tuple[float, float], domain: Domain,
    tumour_site: str = "deep",
) -> _TumourPlan:
    sites = atlas.surface_sites if tumour_site == "surface" else atlas.tumour_sites
    site = sites[rng.integers(len(sites))].astype(np.float64)
    centre = pose.to_target(site[None], atlas.centre)[0]
    low, high = np.log(tumour_volume_ml)
    volume_mm3 = float(np.exp(rng.uniform(low, high))) * 1000.0
    radius = (3.0 * volume_mm3 / (4.0 * np.pi)) ** (1.0 / 3.0)
    necrosis = 0.0 if rng.random() < NO_NECROSIS_PROBABILITY else _uniform(rng, NECROSIS_FRACTION)
    axes = rng.uniform(*AXIS_RATIO_RANGE, 3)
    shape_matrix = np.diag(1.0 / axes) @ _rotation(rng, domain).T
    mass = MASS_EFFECT_MAX * _uniform(rng, MASS_EFFECT_RANDOM) * min(1.0, radius / MASS_EFFECT_REFERENCE_MM)
    return _TumourPlan(
        centre_mm=centre,
        radius_mm=radius,
        core_fraction=_uniform(rng, CORE_FRACTION),
        necrosis_fraction=necrosis,
        enhancing=bool(rng.random() >= NON_ENHANCING_PROBABILITY),
        shape_matrix=shape_matrix,
        irregularity=_uniform(rng, IRREGULARITY),
        mass_effect=mass,
    )


def _coarse_axes(axes_mm: list[np.ndarray]) -> list[np.ndarray]:
    """Evenly spaced axes spanning ``axes_mm`` with about COORDINATE_STEP voxels between points."""
    return [np.linspace(a[0], a[-1], max(2, int(np.ceil((len(a) - 1) / COORDINATE_STEP)) + 1)) for a in axes_mm]


def _source_map(
    rng: np.random.Generator,
    atlas: _Atlas,
    pose: _Pose,
    axes_mm: list[np.ndarray],
    tumour: _TumourPlan | None,
    voxel_mm: float,
    domain: Domain,
) -> np.ndarray:
    """Template voxel (3 x coarse crop, float32) of every point of the crop's coarse axes (``_coarse_axes``).

    The map (pose, smooth deformation, mass effect, ventricle size) is smooth, so it is computed on a
    coarse grid; ``_sampling_grid`` upsamples it.
    """
    coarse = _coarse_axes(axes_mm)
    d = np.stack(np.meshgrid(*[a.astype(np.float32) for a in coarse], indexing="ij"))
    if tumour is not None:
        sigma = tumour.radius_mm * tumour.core_fraction * MASS_EFFECT_WIDTH
        d = _pull(d, tumour.centre_mm, sigma, tumour.mass_effect)
    if domain.ventricle_expansion != (0.0, 0.0):
        ventricles_mm = pose.to_target(atlas.ventricle_centre[None], atlas.centre)[0]
        d = _pull(d, ventricles_mm, VENTRICLE_EXPANSION_WIDTH_MM, _uniform(rng, domain.ventricle_expansion))
    source = np.tensordot(pose.matrix.astype(np.float32), d, axes=1)
    source += (atlas.centre + pose.shift).astype(np.float32)[:, None, None, None]
    control = domain.deformation_control_mm / (voxel_mm * COORDINATE_STEP)
    source += domain.deformation_sd_mm * _smooth_noise(rng, source.shape[1:], control, channels=3)
    return source


def _sampling_grid(source: np.ndarray, atlas: _Atlas, crop_shape: Sequence[int]) -> torch.Tensor:
    """The coarse source map upsampled to a sampling grid of the template (1 x crop x 3, grid_sample order)."""
    size = np.asarray(atlas.channels.shape[2:], dtype=np.float32)
    normalised = 2.0 * source / (size - 1)[:, None, None, None] - 1.0
    coarse_grid = torch.from_numpy(normalised[::-1].copy())[None]
    fine = F.interpolate(coarse_grid, size=tuple(crop_shape), mode="trilinear", align_corners=True)
    return fine.permute(0, 2, 3, 4, 1).contiguous()


def _affine_source(pose: _Pose, atlas: _Atlas, coarse: list[np.ndarray]) -> np.ndarray:
    """Template voxel (3 x coarse) of each point of ``coarse`` axes under the pose alone."""
    d = np.stack(np.meshgrid(*[a.astype(np.float32) for a in coarse], indexing="ij"))
    source = np.tensordot(pose.matrix.astype(np.float32), d, axes=1)
    return source + (atlas.centre + pose.shift).astype(np.float32)[:, None, None, None]


def _head_source(
    source: np.ndarray, pose: _Pose, atlas: _Atlas, crop_axes_mm: list[np.ndarray], shape: Sequence[int],
    voxel_mm: float,
) -> np.ndarray:
    """Template voxel (3 x shape) of every voxel of the whole grid, through the brain's pose and deformation.

    Beyond the crop, the deformation (and any mass effect or ventricle change) is that of the crop's nearest
    edge: the head follows the brain and the map stays smooth.
    """
    crop_coarse = _coarse_axes(crop_axes_mm)
    displacement = source - _affine_source(pose, atlas, crop_coarse)
    full_coarse = _coarse_axes(_grid_mm(shape, voxel_mm))
    index = [np.clip((f - c[0]) / (c[-1] - c[0]) * (len(c) - 1), 0.0, len(c) - 1.0)
             for f, c in zip(full_coarse, crop_coarse)]
    points = np.stack(np.meshgrid(*index, indexing="ij"))
    moved = np.stack([ndimage.map_coordinates(channel, points, order=1) for channel in displacement])
    coarse = _affine_source(pose, atlas, full_coarse) + moved
    fine = F.interpolate(torch.from_numpy(coarse)[None], size=tuple(shape), mode="trilinear", align_corners=True)
    return fine[0].numpy()


def _pull(points_mm: np.ndarray, centre_mm: np.ndarray, sigma_mm: float, strength: float) -> np.ndarray:
    """Move sampling points (3 x ...) towards ``centre_mm`` by a Gaussian-weighted fraction ``strength``.

    Sampling closer to a centre enlarges what lies there (a tumour's mass effect, enlarged ventricles);
    a negative strength shrinks it.
    """
    offset = points_mm - centre_mm.astype(np.float32).reshape(3, *(1,) * (points_mm.ndim - 1))
    weight = strength * np.exp(-np.sum(offset**2, axis=0) / (2.0 * sigma_mm**2))
    return points_mm - offset * weight[None]


def _atrophy(
    rng: np.random.Generator, gm: np.ndarray, brain_p: np.ndarray, wm: np.ndarray, amount: float, voxel_mm: float
) -> np.ndarray:
    """Grey matter next to CSF turned into CSF in a patchy pattern (widened sulci): the new grey-matter map."""
    csf = np.clip(brain_p - gm - wm, 0.0, 1.0)
    near_csf = np.clip(ATROPHY_CSF_GAIN * ndimage.gaussian_filter(csf, ATROPHY_REACH_MM / voxel_mm), 0.0, 1.0)
    patches = np.clip(0.5 + 0.5 * _smooth_noise(rng, gm.shape, ATROPHY_CONTROL_MM / voxel_mm)[0], 0.0, 1.0)
    return gm * (1.0 - amount * near_csf * patches)


def _sample_atlas(grid: torch.Tensor, atlas: _Atlas) -> np.ndarray:
    """Warp the template channels onto the crop (C x crop shape)."""
    warped = F.grid_sample(atlas.channels, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return np.ascontiguousarray(warped[0].numpy())


# --- tumour and benign findings -------------------------------------------------------------------------
@dataclass(frozen=True)
class _TumourFields:
    """Soft (0 to 1) nested whole-tumour, core and necrosis maps within ``box`` of the crop."""

    box: tuple[slice, ...]
    whole: np.ndarray
    core: np.ndarray
    necrosis: np.ndarray


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _box_around(centre_mm: np.ndarray, reach_mm: float, axes_mm: list[np.ndarray]) -> tuple[slice, ...]:
    """Voxel box of the crop within ``reach_mm`` of ``centre_mm`` along each axis (empty slices where none is)."""
    box = []
    for a, axis in enumerate(axes_mm):
        inside = np.nonzero(np.abs(axis - centre_mm[a]) <= reach_mm)[0]
        box.append(slice(int(inside[0]), int(inside[-1]) + 1) if inside.size else slice(0, 0))
    return tuple(box)


def _tumour_box(tumour: _TumourPlan, axes_mm: list[np.ndarray]) -> tuple[slice, ...]:
    return _box_around(tumour.centre_mm, TUMOUR_BOX_RADII * tumour.radius_mm, axes_mm)


def _tumour_fields(
    rng: np.random.Generator,
    tumour: _TumourPlan,
    axes_mm: list[np.ndarray],
    wm: np.ndarray,
    csf: np.ndarray,
    voxel_mm: float,
) -> _TumourFields:
    """Irregular core and necrosis around the centre; oedema reaching further along white matter."""
    box = _tumour_box(tumour, axes_mm)
    sub = [axis[b].astype(np.float32) for axis, b in zip(axes_mm, box)]
    offset = np.stack(np.meshgrid(*sub, indexing="ij")) - tumour.centre_mm.astype(np.float32)[:, None, None, None]
    shaped = np.tensordot(tumour.shape_matrix.astype(np.float32), offset, axes=1)
    radius = np.sqrt(np.sum(shaped**2, axis=0)) / tumour.radius_mm
    noise = _smooth_noise(rng, radius.shape, IRREGULARITY_CONTROL_MM / voxel_mm, channels=3)
    level = radius + tumour.irregularity * noise[0]
    core = _sigmoid((tumour.core_fraction - level) / EDGE_SOFTNESS)
    necrosis_edge = tumour.core_fraction * tumour.necrosis_fraction
    necrosis = np.zeros_like(core)
    if necrosis_edge > 0:
        necrosis = _sigmoid((necrosis_edge - radius - tumour.irregularity * noise[1]) / EDGE_SOFTNESS)
    reach = (1.0 + OEDEMA_WM_GAIN * (wm[box] - 1.0) + OEDEMA_NOISE * noise[2]) * (1.0 - csf[box])
    whole = _sigmoid((reach - level) / (OEDEMA_EDGE_FACTOR * EDGE_SOFTNESS))
    return _TumourFields(box, np.maximum(whole, core), core, np.minimum(necrosis, core))


def _lesion_fractions(
    rng: np.random.Generator, fields: _TumourFields, enhancing: bool, voxel_mm: float
) -> dict[str, np.ndarray]:
    """Partial volume of each lesion tissue within the tumour box, with smooth heterogeneity."""
    hetero = 1.0 + LESION_HETEROGENEITY * _smooth_noise(rng, fields.whole.shape, HETEROGENEITY_CONTROL_MM / voxel_mm)[0]
    fractions = {"oedema": (fields.whole - fields.core) * hetero}
    if enhancing:
        fractions["enhancing"] = (fields.core - fields.necrosis) * hetero
        fractions["necrosis"] = fields.necrosis
    else:
        fractions["non_enhancing"] = fields.core * hetero
    return fractions


def _white_matter_hyperintensities(
    rng: np.random.Generator, wm: np.ndarray, brain: np.ndarray, voxel_mm: float
) -> tuple[np.ndarray, int]:
    """Small Gaussian blobs in deep white matter (0 to 1), and how many."""
    out = np.zeros(wm.shape, np.float32)
    if rng.random() >= WMH_PROBABILITY:
        return out, 0
    sites = np.argwhere((wm > WMH_SITE_MIN_WM) & brain)
    count = int(rng.poisson(WMH_MEAN_COUNT)) if len(sites) else 0
    for _ in range(count):
        centre = sites[rng.integers(len(sites))]
        box, blob = _blob(centre, _uniform(rng, WMH_SIGMA_MM) / voxel_mm, wm.shape)
        out[box] = np.maximum(out[box], _uniform(rng, WMH_GAIN) * blob)
    return out, count


def _blob(centre: np.ndarray, sigma: float, shape: Sequence[int]) -> tuple[tuple[slice, ...], np.ndarray]:
    """A Gaussian blob (peak 1, ``sigma`` in voxels) at voxel ``centre``, within its 3-sigma box of ``shape``."""
    half = int(np.ceil(3 * sigma))
    box = tuple(slice(max(int(c) - half, 0), min(int(c) + half + 1, n)) for c, n in zip(centre, shape))
    grids = np.meshgrid(*[np.arange(b.start, b.stop) - c for b, c in zip(box, centre)], indexing="ij")
    return box, np.exp(-sum(g.astype(np.float32) ** 2 for g in grids) / (2 * sigma**2))


def _hyperintensities(
    rng: np.random.Generator,
    periventricular: np.ndarray,
    wm: np.ndarray,
    brain: np.ndarray,
    fields: _TumourFields | None,
    voxel_mm: float,
) -> tuple[np.ndarray, float, int]:
    """Benign FLAIR findings (0 to 1): periventricular caps and small WMH, none inside the tumour."""
    gain = _uniform(rng, PERIVENTRICULAR_GAIN) if rng.random() < PERIVENTRICULAR_PROBABILITY else 0.0
    offset, scale = PERIVENTRICULAR_PATTERN
    noise = _smooth_noise(rng, brain.shape, PERIVENTRICULAR_CONTROL_MM / voxel_mm)[0]
    pattern = np.clip(offset + scale * noise, 0.0, 1.0)
    wmh, count = _white_matter_hyperintensities(rng, wm, brain, voxel_mm)
    hyper = np.clip(gain * periventricular * pattern + wmh, 0.0, 1.0)
    if fields is not None:
        hyper[fields.box] *= 1.0 - fields.whole
    return hyper, gain, count


@dataclass(frozen=True)
class _BenignAtlas:
    """Template maps the clinical findings are placed by, and sites for lacunes.

    ``channels`` (1 x 3 x X x Y x Z, channels-last) holds the distance (template mm, clipped) from the lateral
    ventricles, from their frontal horns' tips and from their occipital horns' tips.
    """

    channels: torch.Tensor
    grey_sites: np.ndarray  # N x 3 template voxels in the deep grey nuclei
    white_sites: np.ndarray  # M x 3 template voxels in deep white matter


@functools.lru_cache(maxsize=1)
def _benign_atlas() -> _BenignAtlas:
    """The lateral ventricles of the template, their horns' tips and the distance maps, once per process."""
    channels = _atlas().channels[0].numpy()
    gm, wm, brain = (channels[ATLAS_CHANNELS.index(name)] for name in ("gm", "wm", "brain"))
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    depth = ndimage.distance_transform_edt(brain > MEMBERSHIP_THRESHOLD)
    components, count = ndimage.label((csf > MEMBERSHIP_THRESHOLD) & (depth > LATERAL_VENTRICLE_MIN_DEPTH_MM))
    midline = _atlas().centre[0]
    lateral = np.zeros(brain.shape, bool)
    frontal, occipital = [], []
    for label in range(1, count + 1):
        points = np.argwhere(components == label)
        if len(points) < LATERAL_VENTRICLE_MIN_ML * 1000.0 or abs(points[:, 0].mean() - midline) < \
                LATERAL_VENTRICLE_MIN_OFFSET_MM:
            continue
        lateral[components == label] = True
        y = points[:, 1]  # the template's voxel axes run right, anterior, superior (1 mm)
        frontal.append(points[y >= y.max() - HORN_TIP_SPAN_MM].mean(0))
        occipital.append(points[y <= y.min() + HORN_TIP_SPAN_MM].mean(0))
    if len(frontal) != 2:
        raise RuntimeError(f"found {len(frontal)} lateral ventricles in the MNI152 template, expected 2")
    grid = np.indices(brain.shape, dtype=np.float32)

    def distance_to(points: list[np.ndarray]) -> np.ndarray:
        squared = [sum((grid[a] - np.float32(p[a])) ** 2 for a in range(3)) for p in points]
        return np.sqrt(np.minimum(*squared))

    maps = [ndimage.distance_transform_edt(~lateral), distance_to(frontal), distance_to(occipital)]
    stacked = np.minimum(np.stack(maps), DISTANCE_CLIP_MM).astype(np.float32)
    channels = torch.from_numpy(stacked)[None].contiguous(memory_format=torch.channels_last_3d)
    grey_depth, white_depth = LACUNE_SITE_MIN_DEPTH_MM
    grey = np.argwhere((gm > LACUNE_SITE_MIN_TISSUE) & (depth > grey_depth) & (maps[0] > 0))
    white = np.argwhere((wm > LACUNE_SITE_MIN_TISSUE) & (depth > white_depth) & (maps[0] > DEEP_MIN_VENTRICLE_MM))
    keep = [np.linspace(0, len(sites) - 1, min(TUMOUR_SITES_KEPT, len(sites))).astype(int) for sites in (grey, white)]
    return _BenignAtlas(channels, grey[keep[0]], white[keep[1]])


class _FindingsMap:
    """The clinical findings of one case as they are drawn: FLAIR-gain map (0 to 1) and truth labels."""

    def __init__(self, shape: Sequence[int]) -> None:
        self.hyper = np.zeros(tuple(shape), np.float32)
        self.labels = np.zeros(tuple(shape), np.uint8)
        self.counts = {name: 0 for name in BENIGN_CODES}

    def add(self, name: str, shape: np.ndarray, gain: float, box: tuple[slice, ...] = ()) -> None:
        """One finding of type ``name``: membership ``shape`` (0 to 1) over ``box``, at FLAIR gain ``gain``."""
        self.hyper[box] = np.maximum(self.hyper[box], gain * shape)
        labels = self.labels[box]
        labels[(shape >= MEMBERSHIP_THRESHOLD) & (labels <= BENIGN_CODES[name])] = BENIGN_CODES[name]
        self.counts[name] += 1


def _band(distance: np.ndarray, reach_mm: np.ndarray | float) -> np.ndarray:
    """Soft band (0 to 1) of the voxels within ``reach_mm`` of what ``distance`` measures from."""
    return _sigmoid((reach_mm - distance) / BENIGN_EDGE_MM)


def _periventricular_findings(
    rng: np.random.Generator, findings: _FindingsMap, grade: int, distances: np.ndarray, wm: np.ndarray,
    voxel_mm: float,
) -> None:
    """Caps at the horns' tips and a lining, a smooth halo or irregular lesions along the lateral ventricles."""
    if grade == 0:
        return
    ventricle, frontal_tip, occipital_tip = distances
    tips = [frontal_tip] + ([occipital_tip] if rng.random() < OCCIPITAL_CAP_PROBABILITY else [])
    for tip in tips:
        cap = _band(tip, _uniform(rng, CAP_RADIUS_MM)) * _band(ventricle, _uniform(rng, CAP_DEPTH_MM)) * wm
        findings.add("periventricular_cap", cap, _uniform(rng, CAP_GAIN))
    if grade == 1:
        if rng.random() < LINING_PROBABILITY:
            findings.add("periventricular_lining", _band(ventricle, _uniform(rng, LINING_MM)) * wm,
                         _uniform(rng, LINING_GAIN))
        return
    offset, scale, low = BAND_COVERAGE
    coverage = np.clip(offset + scale * _smooth_noise(rng, ventricle.shape, BAND_COVERAGE_CONTROL_MM / voxel_mm)[0],
                       low, 1.0)
    findings.add("periventricular_halo", _band(ventricle, _uniform(rng, HALO_MM) * coverage) * wm,
                 _uniform(rng, HALO_GAIN))
    if grade == 3:
        edges = _smooth_noise(rng, ventricle.shape, BAND_IRREGULARITY_CONTROL_MM / voxel_mm)[0]
        reach = _uniform(rng, CONFLUENT_PV_MM) * coverage * (1.0 + _uniform(rng, BAND_IRREGULARITY) * edges)
        findings.add("periventricular_confluent", _band(ventricle, reach) * wm, _uniform(rng, CONFLUENT_GAIN))


def _deep_findings(
    rng: np.random.Generator, findings: _FindingsMap, grade: int, sites: np.ndarray, wm: np.ndarray, voxel_mm: float
) -> None:
    """Punctate foci and (grades 2 and 3) confluent patches of merged blobs in the deep white matter."""
    if grade == 0 or not len(sites):
        return
    for _ in range(1 + int(rng.poisson(PUNCTATE_MEAN_COUNT[grade]))):
        box, blob = _blob(sites[rng.integers(len(sites))], _uniform(rng, PUNCTATE_SIGMA_MM) / voxel_mm, wm.shape)
        findings.add("deep_punctate", blob * wm[box], _uniform(rng, PUNCTATE_GAIN), box)
    low, high = CONFLUENT_PATCHES[grade]
    for _ in range(int(rng.integers(low, high + 1))):
        size = _uniform(rng, CONFLUENT_PATCH_MM[grade]) / voxel_mm
        centre = sites[rng.integers(len(sites))]
        patch = np.zeros(wm.shape, np.float32)
        for _ in range(int(rng.integers(CONFLUENT_BLOBS[0], CONFLUENT_BLOBS[1] + 1))):
            at = np.clip(centre + rng.normal(0.0, size, 3), 0, np.asarray(wm.shape) - 1)
            box, blob = _blob(at, size * rng.uniform(0.5, 1.0), wm.shape)
            patch[box] = np.maximum(patch[box], blob)
        findings.add("deep_confluent", patch * wm, _uniform(rng, CONFLUENT_GAIN))


def _lacunes(
    rng: np.random.Generator, findings: _FindingsMap, tissue: dict[str, np.ndarray], allowed: np.ndarray,
    benign_atlas: _BenignAtlas, atlas: _Atlas, pose: _Pose, axes_mm: list[np.ndarray],
) -> None:
    """Old lacunar infarcts: a CSF-filled cavity (tissue turned to CSF) in a FLAIR-bright gliotic rim.

    A lacune whose centre falls outside ``allowed`` (the brain outside the tumour) is left out.
    """
    if rng.random() >= LACUNE_PROBABILITY:
        return
    for _ in range(1 + int(rng.poisson(LACUNE_EXTRA_MEAN))):
        sites = benign_atlas.grey_sites if rng.random() < LACUNE_GREY_SHARE else benign_atlas.white_sites
        centre = pose.to_target(sites[rng.integers(len(sites))][None].astype(np.float64), atlas.centre)[0]
        radius, rim = _uniform(rng, LACUNE_RADIUS_MM), _uniform(rng, LACUNE_GLIOSIS_MM)
        gain = _uniform(rng, LACUNE_GLIOSIS_GAIN)
        box = _box_around(centre, radius + rim + 3 * BENIGN_EDGE_MM, axes_mm)
        nearest = tuple(int(np.abs(axis - c).argmin()) for axis, c in zip(axes_mm, centre))
        if any(b.stop <= b.start for b in box) or not allowed[nearest]:
            continue
        offsets = np.meshgrid(*[axis[b].astype(np.float32) - np.float32(c) for axis, b, c in zip(axes_mm, box, centre)],
                              indexing="ij")
        distance = np.sqrt(sum(o**2 for o in offsets))
        cavity = _band(distance, radius)
        solid = tissue["gm"][box] + tissue["wm"][box]
        tissue["csf"][box] += cavity * solid
        tissue["gm"][box] *= 1.0 - cavity
        tissue["wm"][box] *= 1.0 - cavity
        findings.add("lacune", cavity * (solid > MEMBERSHIP_THRESHOLD), 0.0, box)
        gliosis = np.minimum(_band(distance, radius + rim), 1.0 - cavity) * solid  # a shell: the fuzzy intersection
        findings.add("lacune_gliosis", gliosis, gain, box)


def _clinical_findings(
    seed: int,
    grid: torch.Tensor,
    tissue: dict[str, np.ndarray],
    brain: np.ndarray,
    fields: _TumourFields | None,
    atlas: _Atlas,
    pose: _Pose,
    axes_mm: list[np.ndarray],
    voxel_mm: float,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The clinical benign findings of one case, from a random stream of its own (``BENIGN_STREAM``).

    Changes ``tissue`` in place where a lacune's cavity is. Nothing is drawn or labelled inside the tumour.

    Returns:
        The FLAIR-gain map (0 to 1, as the basic ``_hyperintensities``), the truth labels (uint8,
        ``BENIGN_CODES``) on the crop, and the description (Fazekas grades, count of each finding type).
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, BENIGN_STREAM]))
    benign_atlas = _benign_atlas()
    warped = F.grid_sample(benign_atlas.channels, grid, mode="bilinear", padding_mode="border", align_corners=True)
    distances = np.ascontiguousarray(warped[0].numpy())
    outside_tumour = np.ones(brain.shape, bool)
    if fields is not None:
        outside_tumour[fields.box] = fields.whole <= BENIGN_TUMOUR_LEVEL
    wm = tissue["wm"] * brain
    pv_grade = int(rng.choice(len(FAZEKAS_PERIVENTRICULAR), p=FAZEKAS_PERIVENTRICULAR))
    deep_grade = max(0, pv_grade - int(rng.random() < FAZEKAS_DEEP_DROP))
    findings = _FindingsMap(brain.shape)
    _periventricular_findings(rng, findings, pv_grade, distances, wm, voxel_mm)
    deep_sites = np.argwhere((wm > WMH_SITE_MIN_WM) & (distances[0] > DEEP_MIN_VENTRICLE_MM) & outside_tumour)
    _deep_findings(rng, findings, deep_grade, deep_sites, wm, voxel_mm)
    _lacunes(rng, findings, tissue, brain & outside_tumour, benign_atlas, atlas, pose, axes_mm)
    hyper, labels = findings.hyper, findings.labels
    labels[~(brain & outside_tumour)] = 0
    if fields is not None:
        hyper[fields.box] *= 1.0 - fields.whole
    description = {
        "model": "clinical",
        "fazekas_periventricular": pv_grade,
        "fazekas_deep": deep_grade,
        "counts": {name: count for name, count in findings.counts.items() if count},
    }
    return hyper, labels, description


def _benign_volumes_ml(benign: np.ndarray, voxel_ml: float) -> dict[str, float]:
    """Labelled volume (mL) of each finding type present in a truth map."""
    return {name: round(float(np.count_nonzero(benign == code)) * voxel_ml, 3)
            for name, code in BENIGN_CODES.items() if np.any(benign == code)}


# --- rendering ------------------------------------------------------------------------------------------
def _bias_coefficients(rng: np.random.Generator, amplitude: tuple[float, float]) -> np.ndarray:
    """The nine coefficients of a random quadratic polynomial (the log of a bias field)."""
    return rng.standard_normal(9).astype(np.float32) * (_uniform(rng, amplitude) / 3.0)


def _bias_extent(axes_mm: list[np.ndarray]) -> np.ndarray:
    """Half-size (mm) per axis over which a bias polynomial runs from -1 to 1: the crop's."""
    return np.array([max(float(np.abs(a).max()), 1.0) for a in axes_mm])


def _bias_field(c: np.ndarray, axes_mm: list[np.ndarray], extent: np.ndarray) -> np.ndarray:
    """Smooth multiplicative bias: exp of the quadratic polynomial ``c``, constant beyond ``extent``."""
    x, y, z = [np.clip((a / e).astype(np.float32), -1.0, 1.0) for a, e in zip(axes_mm, extent)]
    x, y, z = x[:, None, None], y[None, :, None], z[None, None, :]
    in_plane = c[0] * x + c[1] * x * x + c[2] * x * y + c[3] * y + c[4] * y * y  # X x Y x 1
    field = in_plane + (c[5] * z + c[6] * z * z) + c[7] * x * z + c[8] * y * z
    return np.exp(field)


@dataclass(frozen=True)
class _Rendering:
    """One sequence of the brain on the crop, and how it was acquired (for a head around it)."""

    image: np.ndarray  # int16, skull-stripped
    blurred: np.ndarray  # the blurred brain signal in image units, before noise (it spills past the brain)
    contrast: dict[str, float]  # jittered relative signal per tissue
    bias: np.ndarray  # the bias polynomial's coefficients (over the crop's extent)
    blur_mm: float
    scale: float
    noise_sigma: float


def _render(
    rng: np.random.Generator,
    sequence: str,
    tissue: dict[str, np.ndarray],
    lesion: tuple[tuple[slice, ...], dict[str, np.ndarray]] | None,
    anatomy: tuple[np.ndarray, np.ndarray, np.ndarray],
    axes_mm: list[np.ndarray],
    voxel_mm: float,
    domain: Domain,
    gain: float,
    findings_gain: dict[str, float] = HYPERINTENSITY_GAIN,
) -> _Rendering:
    """One sequence on the crop: tissue mix, lesion, benign findings, bias, blur, Rician noise (int16).

    ``anatomy`` is (template T1, benign findings map 0 to 1, brain); the findings raise the signal by
    ``1 + findings_gain[sequence] * map``.
    """
    template_t1, hyper, brain = anatomy
    contrast = {t: v * (1.0 + domain.tissue_jitter * rng.standard_normal()) for t, v in CONTRAST[sequence].items()}
    signal = sum(tissue[t] * contrast[t] for t in HEALTHY_TISSUES)
    if sequence in TEMPLATE_TEXTURE_SEQUENCES:
        share = sum(tissue[t] for t in HEALTHY_TISSUES)
        signal += TEMPLATE_T1_WEIGHT * (share * template_t1 - signal)
    if lesion is not None:
        box, fractions = lesion
        signal[box] += sum(f * contrast[t] for t, f in fractions.items())
    signal *= 1.0 + findings_gain[sequence] * hyper
    bias = _bias_coefficients(rng, domain.bias_amplitude)
    signal *= _bias_field(bias, axes_mm, _bias_extent(axes_mm))
    blur_mm = _uniform(rng, domain.blur_sigma_mm)
    signal = ndimage.gaussian_filter(signal * brain, blur_mm / voxel_mm, truncate=BLUR_TRUNCATE)
    scale = gain * SCANNER_SCALE[sequence] * (1.0 + domain.scale_jitter * rng.uniform(-1.0, 1.0))
    inside = signal[brain] * scale
    sigma = _uniform(rng, domain.noise_fraction) * contrast["wm"] * scale
    real = inside + sigma * rng.standard_normal(inside.shape, dtype=np.float32)
    imaginary = sigma * rng.standard_normal(inside.shape, dtype=np.float32)
    out = np.zeros(signal.shape, np.int16)
    out[brain] = np.clip(np.rint(np.sqrt(real**2 + imaginary**2)), 1, INT16_MAX).astype(np.int16)
    return _Rendering(out, signal * scale, contrast, bias, blur_mm, scale, sigma)


def _labels(brain: np.ndarray, fields: _TumourFields | None, enhancing: bool) -> np.ndarray:
    """BraTS labels on the crop: oedema 2, core 4 (1 when non-enhancing), necrosis 1; brain only."""
    seg = np.zeros(brain.shape, np.uint8)
    if fields is None:
        return seg
    sub = np.zeros(fields.whole.shape, np.uint8)
    sub[fields.whole > MEMBERSHIP_THRESHOLD] = LABEL_OEDEMA
    sub[fields.core > MEMBERSHIP_THRESHOLD] = LABEL_ENHANCING if enhancing else LABEL_NECROTIC
    sub[fields.necrosis > MEMBERSHIP_THRESHOLD] = LABEL_NECROTIC
    seg[fields.box] = np.where(brain[fields.box], sub, 0)
    return seg


def _centroid(seg: np.ndarray) -> list[int] | None:
    """Rounded voxel centroid of the whole tumour, or None when there is none."""
    points = np.nonzero(seg)
    return [int(round(float(p.mean()))) for p in points] if points[0].size else None


def _label_volumes_ml(seg: np.ndarray, voxel_mm: float) -> dict[str, float]:
    ml = voxel_mm**3 / 1000.0
    labels = (LABEL_NECROTIC, LABEL_OEDEMA, LABEL_ENHANCING)
    return {str(label): round(float(np.count_nonzero(seg == label)) * ml, 3) for label in labels}


def _tissue(gm: np.ndarray, wm: np.ndarray, brain_p: np.ndarray, fields: _TumourFields | None) -> dict[str, np.ndarray]:
    """Healthy partial volumes (CSF = brain minus GM and WM), normalised, displaced by the tumour."""
    csf = np.clip(brain_p - gm - wm, 0.0, 1.0)
    total = np.maximum(gm + wm + csf, np.finfo(np.float32).eps)
    tissue = {"csf": csf / total, "gm": gm / total, "wm": wm / total}
    if fields is not None:
        for name in HEALTHY_TISSUES:
            tissue[name][fields.box] *= 1.0 - fields.whole
    return tissue


def _check_benign_findings(benign_findings: str) -> None:
    if benign_findings not in BENIGN_MODELS:
        raise ValueError(f"benign_findings must be one of {BENIGN_MODELS}, got {benign_findings!r}")


def _check_tumour_volume(tumour_volume_ml: Sequence[float]) -> tuple[float, float]:
    if len(tumour_volume_ml) != 2 or not 0 < tumour_volume_ml[0] <= tumour_volume_ml[1] < np.inf:
        raise ValueError(
            f"tumour_volume_ml must be (low, high) with 0 < low <= high, finite, got {tuple(tumour_volume_ml)}"
        )
    return float(tumour_volume_ml[0]), float(tumour_volume_ml[1])


def synthesize_case(
    seed: int,
    healthy: bool,
    shape: Sequence[int] = BRATS_SHAPE,
    voxel_mm: float = 1.0,
    tumour_volume_ml: Sequence[float] | None = None,
    domain: Domain = TRAINING,
    heads: bool = False,
    tumour_site: str = "deep",
    benign_findings: str = "basic",
) -> SyntheticCase:
    """Generate one case in memory, on the 1 mm grid it is drawn on (``reslice_case`` puts it on a domain's grid).

    Args:
        seed: the case seed (see ``case_seed``); the same seed gives the same case.
        healthy: no tumour when true (benign FLAIR findings may still be present).
        shape: output grid; the default is the BraTS grid. Smaller grids with a larger ``voxel_mm``
            (e.g. 60 x 60 x 39 at 4 mm) cover the same field of view faster, for tests.
        voxel_mm: isotropic voxel size of the output grid.
        tumour_volume_ml: (low, high) range of the nominal whole-tumour volume in mL, drawn log-uniformly
            (the labelled volume differs: oedema reach, irregularity and the brain's edge change it);
            None: the domain's.
        domain: the anatomy and acquisition ranges (``anofpdm.data.domains``).
        heads: grow the rest of the head around the brain (``anofpdm.data.heads``, ranges ``domain.head``),
            from a random stream of its own: the brain, its labels and its skull-stripped images are those
            drawn without heads.
        tumour_site: "deep" (white matter at least 18 mm under the brain's surface) or "surface" (3-9 mm under
            it: tumours at the cortex, which a brain extractor may cut).
        benign_findings: "basic" (periventricular caps and small white-matter blobs; every recorded figure) or
            "clinical" (a Fazekas-graded small-vessel burden, caps, lining, halo, punctate and confluent deep
            lesions, old lacunes with a gliotic rim, from a random stream of their own: all else is the basic
            case of the same seed; the truth map is ``SyntheticCase.benign``).

    Returns:
        The case: int16 images keyed by ``SEQUENCES`` (skull-stripped, or whole heads with ``heads``), uint8
        seg (0, 1, 2, 4), LPS affine, a description (tumour plan, label volumes in mL, benign findings, the
        head's layout), with ``heads`` the uint8 brain mask and with clinical findings their truth map.
    """
    if len(shape) != 3 or min(shape) < MIN_GRID:
        raise ValueError(f"shape must be three sizes of at least {MIN_GRID}, got {tuple(shape)}")
    if voxel_mm <= 0:
        raise ValueError(f"voxel_mm must be positive, got {voxel_mm}")
    tumour_volume_ml = _check_tumour_volume(domain.tumour_volume_ml if tumour_volume_ml is None else tumour_volume_ml)
    if tumour_site not in TUMOUR_SITES:
        raise ValueError(f"tumour_site must be one of {TUMOUR_SITES}, got {tumour_site!r}")
    _check_benign_findings(benign_findings)
    rng = np.random.default_rng(seed)
    atlas = _atlas()
    pose = _draw_pose(rng, domain)
    tumour = None if healthy else _plan_tumour(rng, atlas, pose, tumour_volume_ml, domain, tumour_site)
    crop = _crop_box(atlas, pose, shape, voxel_mm)
    axes_mm = [axis[c] for axis, c in zip(_grid_mm(shape, voxel_mm), crop)]
    source = _source_map(rng, atlas, pose, axes_mm, tumour, voxel_mm, domain)
    grid = _sampling_grid(source, atlas, [len(a) for a in axes_mm])
    gm, wm, brain_p, periventricular, template_t1 = _sample_atlas(grid, atlas)  # ATLAS_CHANNELS order
    atrophy = 0.0
    if domain.cortical_atrophy != (0.0, 0.0):
        atrophy = _uniform(rng, domain.cortical_atrophy)
        gm = _atrophy(rng, gm, brain_p, wm, atrophy, voxel_mm)
    brain = brain_p > MEMBERSHIP_THRESHOLD
    fields = None
    if tumour is not None:
        csf = np.clip(brain_p - gm - wm, 0.0, 1.0)
        fields = _tumour_fields(rng, tumour, axes_mm, wm, csf, voxel_mm)
    tissue = _tissue(gm, wm, brain_p, fields)
    enhancing = tumour is None or tumour.enhancing
    lesion = None if fields is None else (fields.box, _lesion_fractions(rng, fields, enhancing, voxel_mm))
    # drawn in either model, so that the main stream, and with it all but the findings, is that of the basic case
    hyper, pv_gain, wmh_count = _hyperintensities(rng, periventricular, tissue["wm"], brain, fields, voxel_mm)
    benign = None
    if benign_findings == "clinical":
        hyper, benign_crop, benign_info = _clinical_findings(seed, grid, tissue, brain, fields, atlas, pose, axes_mm,
                                                             voxel_mm)
    gain = 1.0 if domain.scanner_gain == (1.0, 1.0) else float(np.exp(_uniform(rng, np.log(domain.scanner_gain))))
    findings_gain = CLINICAL_HYPERINTENSITY_GAIN if benign_findings == "clinical" else HYPERINTENSITY_GAIN
    renderings = {sequence: _render(rng, sequence, tissue, lesion, (template_t1, hyper, brain), axes_mm, voxel_mm,
                                    domain, gain, findings_gain) for sequence in SEQUENCES}
    images = {}
    for sequence, rendering in renderings.items():
        images[sequence] = np.zeros(tuple(shape), np.int16)
        images[sequence][crop] = rendering.image
    seg = np.zeros(tuple(shape), np.uint8)
    seg[crop] = _labels(brain, fields, enhancing)
    info = {
        "seed": int(seed),
        "healthy": bool(healthy),
        "tumour_volume_ml": round(float(np.count_nonzero(seg)) * voxel_mm**3 / 1000.0, 3),
        "label_volumes_ml": _label_volumes_ml(seg, voxel_mm),
        "tumour_type": None if tumour is None else ("enhancing" if tumour.enhancing else "non_enhancing"),
        "tumour_centre_voxel": _centroid(seg),
        "periventricular_gain": round(pv_gain, 3),
        "white_matter_hyperintensities": wmh_count,
    }
    if benign_findings == "clinical":
        benign = np.zeros(tuple(shape), np.uint8)
        benign[crop] = benign_crop
        del info["periventricular_gain"], info["white_matter_hyperintensities"]
        info["benign_findings"] = {**benign_info, "volumes_ml": _benign_volumes_ml(benign, voxel_mm**3 / 1000.0)}
    if domain != TRAINING:
        info.update(domain=domain.name, cortical_atrophy=round(atrophy, 3), scanner_gain=round(gain, 3))
    if tumour is not None and tumour_site != "deep":
        info["tumour_site"] = tumour_site
    if not heads:
        return SyntheticCase(images, seg, brats_affine(shape, voxel_mm), info, benign=benign)
    brain_mask = np.zeros(tuple(shape), bool)
    brain_mask[crop] = brain
    template_vox = _head_source(source, pose, atlas, axes_mm, shape, voxel_mm)
    head_images, layout = _grow_head(seed, template_vox, brain_mask, images, renderings, crop, voxel_mm, domain)
    info["head"] = layout
    return SyntheticCase(head_images, seg, brats_affine(shape, voxel_mm), info, brain_mask.astype(np.uint8), benign)


def _grow_head(
    seed: int,
    template_vox: np.ndarray,
    brain_mask: np.ndarray,
    stripped: dict[str, np.ndarray],
    renderings: dict[str, _Rendering],
    crop: tuple[slice, ...],
    voxel_mm: float,
    domain: Domain,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The head images around the skull-stripped ones (same bias, blur, scale and noise level) and the layout."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, HEAD_STREAM]))
    layout = heads.draw_head(rng, domain.head)
    tissues = heads.head_tissues(rng, layout, template_vox, voxel_mm)
    shape = brain_mask.shape
    full_axes = _grid_mm(shape, voxel_mm)
    crop_axes = [axis[c] for axis, c in zip(full_axes, crop)]
    images = {}
    for sequence, rendering in renderings.items():
        spill = np.zeros(shape, np.float32)
        spill[crop] = rendering.blurred
        bias = _bias_field(rendering.bias, full_axes, _bias_extent(crop_axes))
        acquisition = heads.Acquisition(bias, rendering.blur_mm / voxel_mm, BLUR_TRUNCATE, rendering.scale,
                                        rendering.noise_sigma)
        contrast = heads.draw_head_contrast(rng, sequence, rendering.contrast["csf"], domain.head.contrast_jitter)
        images[sequence] = heads.render_head(rng, tissues, contrast, brain_mask, stripped[sequence], spill,
                                             acquisition)
    return images, layout.describe()


def reslice_case(case: SyntheticCase, domain: Domain, index: int) -> SyntheticCase:
    """Case ``index`` on its domain's grid (the grids are cycled over case indices); unchanged without grids.

    A brain mask and a benign-findings map are resampled by nearest neighbour, as the labels are.
    """
    if not domain.grids:
        return case
    grid = domain.grids[index % len(domain.grids)]
    images, seg, affine = reslice(case.images, case.seg, case.affine, grid)
    brain_mask = None if case.brain_mask is None else reslice_labels(case.brain_mask, case.affine, grid)
    benign = None if case.benign is None else reslice_labels(case.benign, case.affine, grid)
    voxel_ml = float(np.prod(grid.spacing_mm)) / 1000.0
    info = {**case.info, "grid": grid.name, "tumour_volume_ml": round(float(np.count_nonzero(seg)) * voxel_ml, 3),
            "tumour_centre_voxel": _centroid(seg)}
    if benign is not None:
        info["benign_findings"] = {**info["benign_findings"], "volumes_ml": _benign_volumes_ml(benign, voxel_ml)}
    return SyntheticCase(images, seg, affine, info, brain_mask, benign)


# --- writing --------------------------------------------------------------------------------------------
def _save_nifti(
    array: np.ndarray, affine: np.ndarray, path: Path, compress_level: int = DATASET_COMPRESS_LEVEL
) -> None:
    """Write a gzipped NIfTI-1 with the qform and sform set to ``affine`` (scanner space, mm)."""
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    Path(path).write_bytes(gzip.compress(image.to_bytes(), compresslevel=compress_level, mtime=0))


def case_name(index: int) -> str:
    """Case identifier of case ``index``, e.g. SYN_00007."""
    return f"{CASE_PREFIX}{index:0{CASE_DIGITS}d}"


def write_case(case: SyntheticCase, out_dir: Path, name: str) -> Path:
    """Write one case in the BraTS21 layout ``out_dir/<name>/<name>_{flair,t1,t1ce,t2,seg}.nii.gz``.

    A case with heads also gets ``<name>_brainmask.nii.gz`` (uint8), one with clinical benign findings
    ``<name>_benign.nii.gz`` (uint8, ``BENIGN_CODES``); neither is a sequence to the readers.
    """
    case_dir = Path(out_dir) / name
    case_dir.mkdir(parents=True, exist_ok=True)
    for sequence, array in case.images.items():
        _save_nifti(array, case.affine, case_dir / f"{name}_{sequence}.nii.gz")
    _save_nifti(case.seg, case.affine, case_dir / f"{name}_seg.nii.gz")
    if case.brain_mask is not None:
        _save_nifti(case.brain_mask, case.affine, case_dir / f"{name}_{BRAIN_MASK_SUFFIX}.nii.gz")
    if case.benign is not None:
        _save_nifti(case.benign, case.affine, case_dir / f"{name}_{BENIGN_SUFFIX}.nii.gz")
    return case_dir


def _write_studies(case_dir: Path, studies_dir: Path, name: str) -> None:
    """MONAI Label studies layout: ``studies/<name>.nii.gz`` (FLAIR) and ``studies/t2/<name>.nii.gz``."""
    (studies_dir / STUDIES_T2_DIR).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(case_dir / f"{name}_flair.nii.gz", studies_dir / f"{name}.nii.gz")
    shutil.copyfile(case_dir / f"{name}_t2.nii.gz", studies_dir / STUDIES_T2_DIR / f"{name}.nii.gz")


def _validate_generation(n_cases: int, seed: int, healthy_fraction: float) -> None:
    if n_cases < 1:
        raise ValueError(f"n_cases must be at least 1, got {n_cases}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if not 0.0 <= healthy_fraction <= 1.0:
        raise ValueError(f"healthy_fraction must be in [0, 1], got {healthy_fraction}")


def _generate_case(
    index: int, out_dir: Path, seed: int, healthy_fraction: float, tumour_volume_ml: tuple[float, float],
    domain: Domain,
    heads: bool,
    tumour_site: str,
    benign_findings: str,
) -> dict[str, Any]:
    """Synthesise and write case ``index``; its manifest entry."""
    name = case_name(index)
    case = synthesize_case(case_seed(seed, index), is_healthy_index(index, healthy_fraction),
                           tumour_volume_ml=tumour_volume_ml, domain=domain, heads=heads, tumour_site=tumour_site,
                           benign_findings=benign_findings)
    case = reslice_case(case, domain, index)
    case_dir = write_case(case, out_dir, name)
    _write_studies(case_dir, out_dir / STUDIES_DIR, name)
    return {"case": name, **case.info}


def generate_cases(
    out_dir: Path,
    n_cases: int,
    seed: int,
    healthy_fraction: float = 0.2,
    progress: ProgressFn | None = None,
    workers: int = 1,
    tumour_volume_ml: Sequence[float] | None = None,
    domain: Domain | str = TRAINING,
    heads: bool = False,
    tumour_site: str = "deep",
    benign_findings: str = "basic",
) -> dict[str, Any]:
    """Generate synthetic BraTS-format cases and a MONAI Label studies folder.

    Case i uses ``case_seed(seed, i)``, so it is the same whatever ``n_cases``; healthy cases are spread
    evenly (``is_healthy_index``).

    Args:
        out_dir: output folder; gets ``<CASE>/<CASE>_{flair,t1,t1ce,t2,seg}.nii.gz``,
            ``studies/<CASE>.nii.gz`` (FLAIR), ``studies/t2/<CASE>.nii.gz`` and ``manifest.json``.
        n_cases: number of cases.
        seed: run seed (non-negative).
        healthy_fraction: fraction of cases without tumour.
        progress: optional callable(done, total) called after each case.
        workers: processes generating cases in parallel (the cases are identical for any number).
        tumour_volume_ml: (low, high) range of the nominal whole-tumour volume in mL (log-uniform); None: the
            domain's.
        domain: a ``Domain`` or the name of one in ``anofpdm.data.domains.DOMAINS`` ("training", "shifted").
        heads: whole heads (``synthesize_case``): the images and studies hold the head, each case also gets
            ``<CASE>_brainmask.nii.gz`` and the manifest says ``"heads": true`` with the head's ranges.
        tumour_site: "deep" or "surface" (``synthesize_case``).
        benign_findings: "basic" or "clinical" (``synthesize_case``); clinical: each case also gets
            ``<CASE>_benign.nii.gz`` and the manifest lists the codes (``"benign_codes"``).

    Returns:
        The manifest (also written to ``out_dir/manifest.json``).
    """
    _validate_generation(n_cases, seed, healthy_fraction)
    _check_benign_findings(benign_findings)
    if isinstance(domain, str):
        if domain not in DOMAINS:
            raise ValueError(f"unknown domain {domain!r}: expected one of {sorted(DOMAINS)}")
        domain = DOMAINS[domain]
    tumour_volume_ml = _check_tumour_volume(domain.tumour_volume_ml if tumour_volume_ml is None else tumour_volume_ml)
    out_dir = Path(out_dir)
    generate = functools.partial(_generate_case, out_dir=out_dir, seed=seed, healthy_fraction=healthy_fraction,
                                 tumour_volume_ml=tumour_volume_ml, domain=domain, heads=heads,
                                 tumour_site=tumour_site, benign_findings=benign_findings)
    results = ordered_map(generate, range(n_cases), workers, progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = list(results)
    manifest = {
        "generator": "anofpdm.data.synth (MNI152 2009a anatomy from nilearn)",
        "synthetic": True,
        "seed": seed,
        "n_cases": n_cases,
        "healthy_fraction": healthy_fraction,
        "tumour_volume_ml": list(tumour_volume_ml),
        **({"domain": domain.to_dict()} if domain != TRAINING else {
            "shape": list(BRATS_SHAPE), "voxel_mm": 1.0, "affine": brats_affine().tolist()}),
        "labels": {"1": "necrotic / non-enhancing core", "2": "oedema", "4": "enhancing"},
        **({"heads": True, "head_shape": asdict(domain.head)} if heads else {}),
        **({"tumour_site": tumour_site} if tumour_site != "deep" else {}),
        **({"benign_findings": benign_findings, "benign_codes": BENIGN_CODES} if benign_findings != "basic" else {}),
        "cases": cases,
    }
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    return manifest


def write_demo_studies(
    demo_dir: Path, n_cases: int = 3, seed: int = 0, healthy_fraction: float = 1 / 3, head_cases: int = 0
) -> dict[str, Any]:
    """Write a small MONAI Label studies folder: FLAIR + T2 only, truth kept outside the studies.

    Layout: ``demo_dir/studies/<CASE>.nii.gz`` (FLAIR), ``demo_dir/studies/t2/<CASE>.nii.gz`` and
    ``demo_dir/truth/<CASE>_seg.nii.gz``, plus ``demo_dir/truth/manifest.json``. The ``head_cases`` after the
    ``n_cases`` skull-stripped ones hold the whole head, on the ``DEMO_HEAD_GRID`` (a 1 mm head's background noise
    does not compress: 6 MB a volume), with their truth brain ``truth/<CASE>_brainmask.nii.gz``.
    """
    _validate_generation(n_cases, seed, healthy_fraction)
    if head_cases < 0:
        raise ValueError(f"head_cases must be >= 0, got {head_cases}")
    demo_dir = Path(demo_dir)
    studies, truth = demo_dir / STUDIES_DIR, demo_dir / TRUTH_DIR
    (studies / STUDIES_T2_DIR).mkdir(parents=True, exist_ok=True)
    truth.mkdir(parents=True, exist_ok=True)
    cases = []
    for index in range(n_cases + head_cases):
        name = case_name(index)
        head = index >= n_cases
        grid = dict(zip(("shape", "voxel_mm"), DEMO_HEAD_GRID)) if head else {}
        case = synthesize_case(case_seed(seed, index), is_healthy_index(index, healthy_fraction), heads=head, **grid)
        _save_nifti(case.images["flair"], case.affine, studies / f"{name}.nii.gz", DEMO_COMPRESS_LEVEL)
        _save_nifti(case.images["t2"], case.affine, studies / STUDIES_T2_DIR / f"{name}.nii.gz", DEMO_COMPRESS_LEVEL)
        _save_nifti(case.seg, case.affine, truth / f"{name}_seg.nii.gz", DEMO_COMPRESS_LEVEL)
        if head:
            _save_nifti(case.brain_mask, case.affine, truth / f"{name}_{BRAIN_MASK_SUFFIX}.nii.gz", DEMO_COMPRESS_LEVEL)
        cases.append({"case": name, **case.info})
    manifest = {
        "synthetic": True,
        "seed": seed,
        "n_cases": n_cases,
        "healthy_fraction": healthy_fraction,
        **({"head_cases": head_cases, "head_grid": {"shape": list(DEMO_HEAD_GRID[0]), "voxel_mm": DEMO_HEAD_GRID[1]}}
           if head_cases else {}),
        "cases": cases,
    }
    (truth / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    return manifest
