"""The rest of the head around a synthetic brain (``anofpdm.data.synth`` with heads on).

The tissues outside the brain are laid out in MNI152 space, where the brain template lives, as functions of
two things: the distance from the template's brain surface and the MNI position. Layers follow the brain
outwards (subarachnoid CSF, skull with diploic marrow between two tables of cortical bone, temporal muscles,
subcutaneous fat, skin); the face (orbits with the eyes and their fat, nasal cavity and maxillary sinuses),
the neck and the spinal cord are placed anterior-inferiorly and inferiorly. Each case draws the layer
thicknesses, their smooth spatial variation, the face's size and the eyes' places from a ``HeadShape``.
``synth`` evaluates these maps at the template position of every output voxel, through the same pose and
deformation as the brain, so the head follows the brain; it then renders them with ``render_head``.

A proxy for a head, not an anatomical model: no ears, teeth, vessels, mastoid or frontal sinuses.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from anofpdm.data.domains import HeadShape

__all__ = [
    "HEAD_TISSUES", "Acquisition", "HeadLayout", "draw_head", "draw_head_contrast", "head_tissues", "render_head",
]

INT16_MAX = 32767
MEMBERSHIP_THRESHOLD = 0.5  # the template's soft brain mask -> the surface the layers grow from
DISTANCE_STEP_MM = 2.0  # the distance-from-brain map is kept at this spacing (it is smooth)
DISTANCE_PADDING_MM = 48.0  # room around the template's box for the layers, the face and the neck
THICKNESS_CONTROL_MM = 35.0  # scale of the smooth variation of the layer thicknesses
MIN_THICKNESS_FRACTION = 0.4  # a layer never thins below this fraction of its drawn thickness
JITTER_LIMIT = 2.0  # contrast jitter is clipped at this many standard deviations (fat stays brighter than bone)

# --- anatomy (MNI millimetres, right-anterior-superior) -----------------------------------------------------
SKULL_TABLE_FRACTION = 0.3  # each table of cortical bone is this fraction of the skull's thickness
SCALP_MUSCLE_MM = 1.0  # thin muscle (galea, occipitofrontalis) between the skull and the fat everywhere
TEMPORALIS_CENTRE = (0.0, 10.0)  # (y, z) of the temporal muscles' thickest part
TEMPORALIS_WIDTH = (40.0, 30.0)  # Gaussian widths along y and z
TEMPORALIS_LATERAL_MM = (35.0, 20.0)  # the muscle starts at |x| = first value and is full over the second
EYE_CENTRE = (32.0, 60.0, -40.0)  # right eye; the left one mirrors x
EYE_RADIUS_MM = 11.5
ORBIT_RADIUS_MM = 17.0  # orbital fat fills this sphere around the globe (behind it, not in front)
ORBIT_BEHIND_MM = 6.0  # the orbit's centre lies this far behind the globe's
FACE_CENTRE = (0.0, 45.0, -62.0)
FACE_RADII = (55.0, 50.0, 44.0)
NASAL_CENTRE, NASAL_RADII = (0.0, 62.0, -58.0), (8.0, 26.0, 16.0)
MAXILLARY_CENTRE, MAXILLARY_RADII = (28.0, 52.0, -68.0), (13.0, 16.0, 14.0)  # right; the left mirrors x
NECK_TOP_MM = -50.0  # the neck's soft tissue starts below this MNI z
NECK_CENTRE, NECK_RADII = (0.0, -25.0), (55.0, 62.0)  # (x, y) and radii of its elliptic cross-section
CORD_CENTRE = (0.0, -45.0)  # (x, y) of the spinal cord below the template's brainstem
CORD_TOP_MM = -70.0
CORD_RADIUS_MM = 7.0
CORD_CSF_MM = 3.0  # CSF around the cord

# --- contrast ------------------------------------------------------------------------------------------------
# Relative signal per sequence on the brain's scale (white matter of FLAIR around 0.75). Fat is bright on T1 and
# fast-spin-echo T2 and moderately bright on FLAIR; cortical bone dark everywhere; muscle dark-ish; vitreous and
# CSF dark on FLAIR and bright on T2; the cord like white matter. Outer CSF takes the brain's own CSF contrast.
HEAD_TISSUES = ("csf", "bone", "marrow", "muscle", "fat", "skin", "vitreous", "cord")
HEAD_CONTRAST = {
    sequence: dict(zip(HEAD_TISSUES[1:], values))
    for sequence, values in {
        "flair": (0.05, 0.75, 0.42, 0.9, 0.65, 0.1, 0.75),
        "t1": (0.06, 1.2, 0.6, 1.35, 0.8, 0.22, 0.9),
        "t1ce": (0.06, 1.2, 0.68, 1.35, 0.9, 0.22, 0.9),
        "t2": (0.05, 1.05, 0.45, 1.3, 0.7, 2.2, 0.75),
    }.items()
}


@dataclass(frozen=True)
class Acquisition:
    """How the brain of one sequence was acquired, for the head around it to share."""

    bias: np.ndarray  # multiplicative bias field on the output grid
    blur_sigma_vox: float
    blur_truncate: float  # Gaussian kernel half-width in sigmas
    scale: float  # image units per relative signal
    noise_sigma: float  # Rician noise level in image units


@dataclass(frozen=True)
class HeadLayout:
    """One case's head: layer thicknesses (mm), face scale, eye shift (mm) and smooth thickness variation."""

    subarachnoid_mm: float
    skull_mm: float
    temporalis_mm: float
    fat_mm: float
    skin_mm: float
    face_scale: float
    eye_shift_mm: np.ndarray  # 2 x 3: right and left eye
    variation: float

    def describe(self) -> dict[str, Any]:
        """The drawn values, rounded, for the case's description."""
        names = ("subarachnoid_mm", "skull_mm", "temporalis_mm", "fat_mm", "skin_mm", "face_scale")
        return {name: round(float(getattr(self, name)), 2) for name in names}


@dataclass(frozen=True)
class _DistanceMap:
    """Distance (mm) from the template's brain, on a padded coarse grid over the template's voxels."""

    distance: torch.Tensor  # 1 x 1 x X x Y x Z
    origin_vox: np.ndarray  # template voxel of the map's first sample
    origin_mm: np.ndarray  # MNI millimetres of template voxel 0


@functools.lru_cache(maxsize=1)
def _distance_map() -> _DistanceMap:
    """Distance outside the MNI152 2009a brain mask shipped in nilearn's wheel, once per process."""
    from nilearn import datasets

    image = datasets.load_mni152_brain_mask(resolution=1)
    if not np.allclose(image.affine[:3, :3], np.eye(3)):
        raise ValueError("the MNI152 brain mask is expected on a 1 mm RAS grid")
    step = int(DISTANCE_STEP_MM)
    pad = int(DISTANCE_PADDING_MM)
    brain = np.pad(image.get_fdata(dtype=np.float32) > MEMBERSHIP_THRESHOLD, pad)[::step, ::step, ::step]
    distance = ndimage.distance_transform_edt(~brain).astype(np.float32) * step
    return _DistanceMap(torch.from_numpy(distance)[None, None], np.full(3, -float(pad)), image.affine[:3, 3].copy())


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(*bounds))


def draw_head(rng: np.random.Generator, shape: HeadShape) -> HeadLayout:
    """Draw one case's head layout from the ranges of ``shape``."""
    return HeadLayout(
        subarachnoid_mm=_uniform(rng, shape.subarachnoid_mm),
        skull_mm=_uniform(rng, shape.skull_mm),
        temporalis_mm=_uniform(rng, shape.temporalis_mm),
        fat_mm=_uniform(rng, shape.fat_mm),
        skin_mm=_uniform(rng, shape.skin_mm),
        face_scale=_uniform(rng, shape.face_scale),
        eye_shift_mm=rng.uniform(-shape.eye_offset_mm, shape.eye_offset_mm, (2, 3)),
        variation=shape.thickness_variation,
    )


def draw_head_contrast(rng: np.random.Generator, sequence: str, csf: float, jitter: float) -> dict[str, float]:
    """The head tissues' relative signals in ``sequence``, jittered; outer CSF is given (the brain's CSF).

    Raises:
        ValueError: for a negative jitter or one that could reverse a contrast (above 1 / (2 JITTER_LIMIT)).
    """
    if not 0.0 <= jitter <= 0.5 / JITTER_LIMIT:
        raise ValueError(f"jitter must be in [0, {0.5 / JITTER_LIMIT}], got {jitter}")
    contrast = {name: value * (1.0 + jitter * float(np.clip(rng.standard_normal(), -JITTER_LIMIT, JITTER_LIMIT)))
                for name, value in HEAD_CONTRAST[sequence].items()}
    return {"csf": csf, **{name: max(value, 0.0) for name, value in contrast.items()}}


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], control_vox: float, channels: int) -> np.ndarray:
    """Unit-variance smooth noise (channels x shape) from random control points, upsampled trilinearly."""
    control = tuple(max(2, int(np.ceil(n / control_vox)) + 1) for n in shape)
    raw = ndimage.gaussian_filter(rng.standard_normal((channels, *control)), (0, 1.0, 1.0, 1.0), mode="nearest")
    raw = (raw / max(float(raw.std()), np.finfo(np.float32).eps)).astype(np.float32)
    return F.interpolate(torch.from_numpy(raw)[None], size=shape, mode="trilinear", align_corners=True)[0].numpy()


def _inside(value: np.ndarray, edge: np.ndarray | float, softness: float) -> np.ndarray:
    """Soft membership of ``value < edge``: a linear ramp ``softness`` wide (partial volume)."""
    return np.clip((edge - value) / softness + 0.5, 0.0, 1.0)


def _ellipsoid(mm: np.ndarray, centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Approximate signed distance (mm, negative inside) to an ellipsoid."""
    offset = (mm - centre.reshape(3, 1, 1, 1)) / radii.reshape(3, 1, 1, 1)
    return (np.sqrt(np.sum(offset**2, axis=0)) - 1.0) * float(radii.min())


def _sample_distance(template_vox: np.ndarray) -> np.ndarray:
    """Distance from the template's brain (mm) at template voxel positions (3 x shape)."""
    field = _distance_map()
    size = np.asarray(field.distance.shape[2:], dtype=np.float32)
    index = (template_vox - field.origin_vox.reshape(3, 1, 1, 1)) / DISTANCE_STEP_MM
    normalised = 2.0 * index / (size - 1).reshape(3, 1, 1, 1) - 1.0
    grid = torch.from_numpy(np.ascontiguousarray(normalised[::-1].transpose(1, 2, 3, 0), dtype=np.float32))[None]
    return F.grid_sample(field.distance, grid, mode="bilinear", padding_mode="border", align_corners=True)[0, 0].numpy()


def _claim(tissues: dict[str, np.ndarray], overrides: list[tuple[str | None, np.ndarray]]) -> None:
    """Give the regions of ``overrides`` (highest priority first; None: air) to their tissue, in place."""
    claimed = np.zeros_like(next(iter(tissues.values())))
    shares = []
    for name, membership in overrides:
        share = membership * (1.0 - claimed)
        claimed += share
        shares.append((name, share))
    for name in tissues:
        tissues[name] *= 1.0 - claimed
    for name, share in shares:
        if name is not None:
            tissues[name] += share


def head_tissues(
    rng: np.random.Generator, layout: HeadLayout, template_vox: np.ndarray, voxel_mm: float
) -> dict[str, np.ndarray]:
    """Partial volume (0 to 1) of each tissue in ``HEAD_TISSUES`` outside the template's brain.

    Args:
        rng: the head's random stream (smooth variation of the layer thicknesses).
        layout: the case's head layout (``draw_head``).
        template_vox: template voxel position (MNI152 1 mm grid) of every output voxel, 3 x shape.
        voxel_mm: output voxel size; tissue edges are ramps this wide.

    Returns:
        Tissue -> float32 array of the output shape; brain voxels are not excluded (the caller's brain is).
    """
    if template_vox.ndim != 4 or template_vox.shape[0] != 3:
        raise ValueError(f"template_vox must be 3 x X x Y x Z, got shape {template_vox.shape}")
    if voxel_mm <= 0:
        raise ValueError(f"voxel_mm must be positive, got {voxel_mm}")
    shape = template_vox.shape[1:]
    mm = template_vox + _distance_map().origin_mm.astype(np.float32).reshape(3, 1, 1, 1)
    x, y, z = mm
    distance = _sample_distance(template_vox)
    noise = _smooth_field(rng, shape, THICKNESS_CONTROL_MM / voxel_mm, channels=2)
    skull_scale = np.maximum(1.0 + layout.variation * noise[0], MIN_THICKNESS_FRACTION)
    soft_scale = np.maximum(1.0 + layout.variation * noise[1], MIN_THICKNESS_FRACTION)
    soft = float(voxel_mm)
    csf_edge = layout.subarachnoid_mm * skull_scale
    skull_edge = csf_edge + layout.skull_mm * skull_scale
    table = SKULL_TABLE_FRACTION * layout.skull_mm * skull_scale
    within_csf = _inside(distance, csf_edge, soft)
    within_skull = _inside(distance, skull_edge, soft)
    marrow = _inside(distance, skull_edge - table, soft) - _inside(distance, csf_edge + table, soft)
    marrow = np.clip(marrow, 0.0, 1.0)
    lateral = np.clip((np.abs(x) - TEMPORALIS_LATERAL_MM[0]) / TEMPORALIS_LATERAL_MM[1], 0.0, 1.0)
    temporal = np.exp(-(((y - TEMPORALIS_CENTRE[0]) / TEMPORALIS_WIDTH[0]) ** 2
                        + ((z - TEMPORALIS_CENTRE[1]) / TEMPORALIS_WIDTH[1]) ** 2))
    muscle_mm = SCALP_MUSCLE_MM + layout.temporalis_mm * lateral * temporal
    beyond_skull = distance - skull_edge
    cover = (muscle_mm + layout.fat_mm + layout.skin_mm) * soft_scale
    face = _ellipsoid(mm, np.asarray(FACE_CENTRE), layout.face_scale * np.asarray(FACE_RADII))
    neck_radial = np.sqrt(((x - NECK_CENTRE[0]) / NECK_RADII[0]) ** 2 + ((y - NECK_CENTRE[1]) / NECK_RADII[1]) ** 2)
    neck = np.maximum((neck_radial - 1.0) * layout.face_scale * min(NECK_RADII), z - NECK_TOP_MM)
    surface = np.minimum(np.minimum(beyond_skull - cover, face), neck)  # negative inside the head
    in_head = _inside(surface, 0.0, soft)
    under_skin = _inside(surface, -layout.skin_mm * soft_scale, soft)
    under_fat = _inside(surface, -(layout.skin_mm + layout.fat_mm) * soft_scale, soft)
    outside_skull = 1.0 - within_skull
    tissues = {name: np.zeros(shape, np.float32) for name in HEAD_TISSUES}
    tissues["csf"] = within_csf
    tissues["marrow"] = marrow * (within_skull - within_csf)
    tissues["bone"] = within_skull - within_csf - tissues["marrow"]
    tissues["skin"] = (in_head - under_skin) * outside_skull
    tissues["fat"] = (under_skin - under_fat) * outside_skull
    tissues["muscle"] = under_fat * outside_skull
    face_overrides: list[tuple[str | None, np.ndarray]] = []
    for side, sign in enumerate((1.0, -1.0)):
        mirror = np.array([sign, 1.0, 1.0])
        eye = mirror * np.asarray(EYE_CENTRE) + layout.eye_shift_mm[side]
        face_overrides.append(("vitreous", _inside(_ellipsoid(mm, eye, np.full(3, EYE_RADIUS_MM)), 0.0, soft)))
        orbit = eye - np.array([0.0, ORBIT_BEHIND_MM, 0.0])
        face_overrides.append(("fat", _inside(_ellipsoid(mm, orbit, np.full(3, ORBIT_RADIUS_MM)), 0.0, soft)))
        sinus = mirror * np.asarray(MAXILLARY_CENTRE)
        face_overrides.append((None, _inside(_ellipsoid(mm, sinus, np.asarray(MAXILLARY_RADII)), 0.0, soft)))
    face_overrides.append((None, _inside(_ellipsoid(mm, np.asarray(NASAL_CENTRE), np.asarray(NASAL_RADII)), 0.0, soft)))
    _claim(tissues, [(name, membership * outside_skull * in_head) for name, membership in face_overrides])
    cord_radial = np.sqrt((x - CORD_CENTRE[0]) ** 2 + (y - CORD_CENTRE[1]) ** 2)
    below = _inside(z, CORD_TOP_MM, soft)
    _claim(tissues, [("cord", _inside(cord_radial, CORD_RADIUS_MM, soft) * below),
                     ("csf", _inside(cord_radial, CORD_RADIUS_MM + CORD_CSF_MM, soft) * below)])
    return tissues


def render_head(
    rng: np.random.Generator,
    tissues: dict[str, np.ndarray],
    contrast: dict[str, float],
    brain: np.ndarray,
    stripped: np.ndarray,
    spill: np.ndarray,
    acquisition: Acquisition,
) -> np.ndarray:
    """One head image: the skull-stripped brain, with the head's signal around it, as one acquisition.

    The head's signal takes the brain's bias field, blur and scale. Inside the brain the image is the
    skull-stripped one plus what the blur carries in from the tissues around it; outside, the brain's blurred
    edge plus the head's blurred signal, with Rician noise of the brain's level (Rayleigh noise in air).

    Args:
        rng: the head's random stream (noise).
        tissues: partial volumes from ``head_tissues``.
        contrast: relative signal per head tissue (``draw_head_contrast``).
        brain: boolean brain mask (where ``stripped`` is nonzero).
        stripped: the skull-stripped int16 image.
        spill: the brain's blurred signal in image units (what the blur spreads outside the brain).
        acquisition: the brain's bias field, blur, scale and noise in this sequence.

    Returns:
        The int16 head image.
    """
    if not (brain.shape == stripped.shape == spill.shape == acquisition.bias.shape):
        raise ValueError("brain, stripped, spill and the bias field must share one shape")
    signal = sum(tissues[name] * contrast[name] for name in HEAD_TISSUES) * (~brain) * acquisition.bias
    signal = ndimage.gaussian_filter(signal.astype(np.float32), acquisition.blur_sigma_vox,
                                     truncate=acquisition.blur_truncate) * acquisition.scale
    sigma = acquisition.noise_sigma
    outside = ~brain
    value = spill[outside] + signal[outside]
    real = value + sigma * rng.standard_normal(value.shape, dtype=np.float32)
    imaginary = sigma * rng.standard_normal(value.shape, dtype=np.float32)
    out = stripped.copy()
    out[brain] = np.clip(np.rint(stripped[brain] + signal[brain]), 1, INT16_MAX).astype(np.int16)
    out[outside] = np.clip(np.rint(np.sqrt(real**2 + imaginary**2)), 0, INT16_MAX).astype(np.int16)
    return out
