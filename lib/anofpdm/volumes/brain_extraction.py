"""Brain extraction from FLAIR and T2 heads, the first step of the pipeline (docs/brain-extraction.md).

Scans as a scanner writes them hold the skull, scalp, fat, eyes, neck and a noisy background; the method (and the
network) knows only skull-stripped brains. When the reference sequence (the FLAIR) is a head (more nonzero volume
than any brain, ``HEAD_MIN_NONZERO_ML``), it is resampled to ``WORKING_SPACING_MM`` isotropic RAS and passed
through deepbet's two networks (Fisch et al., 2024: a box network at 128^3, then the brain network at 256^3 inside
the box), whose TorchScript weights ship inside the ``deepbet`` wheel: nothing is downloaded. The brain
probability goes back onto the FLAIR's grid; its largest piece is kept and its holes filled, and it is refused when
its volume is implausible, when it is in several large pieces or when the scan cuts it off at the vertex (a brain
reaching another edge of the field of view is a warning). The other sequences that are heads are stripped with that
brain; after alignment every sequence gets the one brain (``apply_brain``), as skull-stripped training data has it.

``brain_extraction``: ``auto`` (default) extracts from a head and leaves a skull-stripped brain as it is, so such
inputs give the same mask as without this step; ``always`` extracts in every case; ``never`` leaves every sequence
as it came (a head is then refused by the input checks).

deepbet was trained on T1 images; on FLAIR heads it does better than on T2 heads, hence the FLAIR's brain for all
(figures in docs/brain-extraction.md).
"""

from __future__ import annotations

import functools
import importlib.util
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from scipy import ndimage

from anofpdm.runtime import mapped_large_buffers, release_free_memory
from anofpdm.volumes.alignment import nifti_to_itk
from anofpdm.volumes.checks import InputError, as_3d, same_grid, voxel_ml
from anofpdm.volumes.reading import LPS_TO_RAS

__all__ = [
    "BRAIN_EXTRACTION_MODES", "BrainExtraction", "extract_brain", "apply_brain", "brain_probability",
    "brain_network_probability",
]

BRAIN_EXTRACTION_MODES = ("auto", "always", "never")
HEAD_MIN_NONZERO_ML = 2500.0  # no skull-stripped brain has this much nonzero volume (intracranial: ~1.1-1.9 L)
WORKING_SPACING_MM = 1.0  # deepbet's networks were trained on ~1 mm T1 images
BOX_SHAPE = (128, 128, 128)  # deepbet's box network input
BRAIN_SHAPE = (256, 256, 256)  # deepbet's brain network input
BOX_MARGIN = 0.1  # share of the box size added on each side, as deepbet does
INTENSITY_QUANTILES = (0.005, 0.995)  # deepbet's intensity window, from the box-network input
IMAGENET_MEAN, IMAGENET_STD = 0.449, 0.226  # deepbet's input standardisation
PROBABILITY_THRESHOLD = 0.5
# an extracted brain outside this is a failure, not a brain (intracranial volumes ~1.1-1.9 L; the synthetic shifted
# domain's brains reach 2.4 L; the skull-stripped input check allows up to MAX_BRAIN_ML, 3 L)
BRAIN_ML_RANGE = (500.0, 3000.0)
MAX_OTHER_PIECES_ML = 20.0  # a second piece of brain mask larger than this: the extraction is not one brain
# brain on a face of the field of view (the lowest excepted: the brainstem leaves every scan there): beyond the
# first the brain may be cut off (a warning); beyond the second on the top face, about 5 mm of brain is missing at
# the vertex (a cap of a 75 mm sphere cut 5 mm deep has a 2400 mm^2 base): refused
EDGE_WARNING_MM2 = 400.0
MAX_TOP_BRAIN_MM2 = 2500.0
DEEPBET_MODELS = ("bbox_model.pt", "model.pt")  # box network, brain network (in the wheel's data/models/)
STRIP_MARGIN_MM = 4.0  # a head on another grid is stripped this far beyond the brain, for head motion


@dataclass
class BrainExtraction:
    """What brain extraction did (the report's ``brain_extraction`` entry) and the brain mask it gives.

    Attributes:
        mode: the option it ran under ("auto", "always", "never").
        extracted: whether a brain was extracted here (False: every sequence was used as it came).
        method: the extractor and its version when extracted, else None.
        brain_ml: the brain's volume in mL (the reference's nonzero volume when nothing was extracted).
        sequences: per sequence, what was done to it and why.
        nonzero_ml: per sequence, its nonzero volume in mL as it came (what tells a head from a brain).
        time_s: time taken.
        mask: the brain on the reference (FLAIR) grid (not part of ``to_dict``).
        warnings: a brain that reaches the edge of the field of view.
    """

    mode: str
    extracted: bool
    method: str | None
    brain_ml: float
    sequences: dict[str, str]
    nonzero_ml: dict[str, float]
    time_s: float
    mask: np.ndarray = field(repr=False)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, rounded, without the mask."""
        out = {key: value for key, value in asdict(self).items() if key != "mask"}
        out["brain_ml"] = round(self.brain_ml, 1)
        out["nonzero_ml"] = {name: round(value, 1) for name, value in self.nonzero_ml.items()}
        out["time_s"] = round(self.time_s, 3)
        return out


@functools.lru_cache(maxsize=2)
def _deepbet_networks(device: str) -> tuple[torch.jit.ScriptModule, torch.jit.ScriptModule, str]:
    """deepbet's box and brain networks on ``device``, and the package version.

    The weights are read from the installed wheel's ``data/models`` (where deepbet itself reads them) without
    importing the package, whose ``__init__`` pulls in its own post-processing dependencies that this project
    does with scipy.
    """
    spec = importlib.util.find_spec("deepbet")
    if spec is None or spec.origin is None:
        raise RuntimeError("brain extraction needs the deepbet package (pip install deepbet==1.0.2 --no-deps)")
    models = Path(spec.origin).resolve().parents[1] / "data" / "models"
    missing = [name for name in DEEPBET_MODELS if not (models / name).is_file()]
    if missing:
        raise RuntimeError(f"deepbet's weights {missing} are not under {models}: reinstall deepbet")
    networks = tuple(torch.jit.load(str(models / name), map_location=device).eval() for name in DEEPBET_MODELS)
    from importlib.metadata import version

    return networks[0], networks[1], f"deepbet {version('deepbet')}"


def _working_image(data: np.ndarray, affine: np.ndarray) -> tuple[sitk.Image, sitk.Image]:
    """The volume as an ITK image and its resampling on an isotropic RAS grid of ``WORKING_SPACING_MM``."""
    image = nifti_to_itk(data, affine, "the volume")
    corners = np.array([[i, j, k, 1.0] for i in (0, data.shape[0] - 1) for j in (0, data.shape[1] - 1)
                        for k in (0, data.shape[2] - 1)])
    ras = (np.asarray(affine) @ corners.T).T[:, :3]
    low, high = ras.min(axis=0), ras.max(axis=0)
    size = np.maximum(1, np.ceil((high - low) / WORKING_SPACING_MM).astype(int) + 1)
    grid = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    grid.SetSpacing([WORKING_SPACING_MM] * 3)
    grid.SetDirection(np.diag(np.diag(LPS_TO_RAS)[:3]).flatten().tolist())  # RAS axes in ITK's LPS space
    grid.SetOrigin((np.diag(LPS_TO_RAS)[:3] * low).tolist())
    working = sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return image, working


def _standardise(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """deepbet's input: ``x`` windowed to [low, high] and standardised, in place (``x`` is a working copy of
    256^3 floats: no temporaries of its size)."""
    x.sub_(low).div_(high - low).clamp_(0.0, 1.0)
    mean, std = x.mean(), x.std()
    return x.sub_(mean).mul_(IMAGENET_STD / std).add_(IMAGENET_MEAN)


def _box(probability: torch.Tensor, shape: Sequence[int]) -> tuple[slice, slice, slice]:
    """The box (with ``BOX_MARGIN``) around the largest piece of the box network's brain, on a grid of ``shape``."""
    labels, count = ndimage.label(probability.cpu().numpy() > PROBABILITY_THRESHOLD)
    if count == 0:
        raise InputError("brain extraction found no brain-like region in the volume: is it a head MRI?")
    largest = np.argmax(np.bincount(labels.ravel())[1:]) + 1
    points = np.argwhere(labels == largest)
    scale = np.asarray(shape, dtype=np.float64) / np.asarray(probability.shape, dtype=np.float64)
    first, last = points.min(axis=0) * scale, (points.max(axis=0) + 1) * scale
    centre, size = (first + last) / 2.0, (last - first) * (1.0 + 2.0 * BOX_MARGIN)
    return tuple(slice(max(0, int(round(c - s / 2))), min(n, int(round(c + s / 2))))
                 for c, s, n in zip(centre, size, shape))


CHUNK_SLICES = 2  # output slices per pass of the brain network's first and last layers
# deepbet 1.0.2's brain network, first block (its scripted graph): a 7^3 convolution of stride 2 without bias,
# instance norm, ReLU, 3^3 max pooling of stride 2 and padding 1; ``_first_block`` equals it (tested)
FIRST_KERNEL, FIRST_STRIDE, INSTANCE_NORM_EPS = 7, 2, 1e-5


def _first_block(block: torch.jit.ScriptModule, x: torch.Tensor) -> torch.Tensor:
    """The brain network's first block on ``x`` (1 x 1 x D x H x W), ``CHUNK_SLICES`` pooled slices at a time.

    The convolution's full output (16 x 128^3 for a 256^3 input, with its working copy 0.27 GB) never exists:
    a first pass over chunks of it sums the instance norm's statistics, a second recomputes each chunk (with the
    row the pooling windows share), normalises it, and pools it. The ReLU before the pooling makes every value
    >= 0, so zero rows stand for the pooling's padding.
    """
    weight = getattr(block, "0").weight
    pad, length = FIRST_KERNEL // 2, x.shape[2]
    depth = (length + 2 * pad - FIRST_KERNEL) // FIRST_STRIDE + 1  # the convolution's output slices

    def convolved(first: int, last: int) -> torch.Tensor:  # its output slices [first, last), 0 <= first < last <= depth
        low, high = first * FIRST_STRIDE - pad, (last - 1) * FIRST_STRIDE - pad + FIRST_KERNEL
        part = F.pad(x[:, :, max(0, low):min(length, high)], (0, 0, 0, 0, max(0, -low), max(0, high - length)))
        return F.conv3d(part, weight, stride=FIRST_STRIDE, padding=(0, pad, pad))

    total = squares = 0.0
    for first in range(0, depth, CHUNK_SLICES):
        rows = convolved(first, min(depth, first + CHUNK_SLICES)).double()
        total, squares = total + rows.sum(dim=(0, 2, 3, 4)), squares + rows.square().sum(dim=(0, 2, 3, 4))
    count = depth * rows.shape[3] * rows.shape[4]
    mean = total / count
    scale = 1.0 / torch.sqrt(squares / count - mean.square() + INSTANCE_NORM_EPS)
    mean, scale = (value.to(x.dtype).view(1, -1, 1, 1, 1) for value in (mean, scale))
    pooled_depth = (depth - 1) // 2 + 1  # kernel 3, stride 2, padding 1
    out = None
    for start in range(0, pooled_depth, CHUNK_SLICES):
        stop = min(pooled_depth, start + CHUNK_SLICES)
        first, last = 2 * start - 1, 2 * stop  # the convolution's slices the pooling windows read
        rows = convolved(max(0, first), min(depth, last)).sub_(mean).mul_(scale).relu_()
        rows = F.pad(rows, (0, 0, 0, 0, max(0, -first), max(0, last - depth)))
        chunk = F.max_pool3d(rows, 3, stride=2, padding=(0, 1, 1))
        if out is None:
            out = chunk.new_empty((*chunk.shape[:2], pooled_depth, *chunk.shape[3:]))
        out[:, :, start:stop] = chunk
    return out


def brain_network_probability(network: torch.jit.ScriptModule, x: torch.Tensor, consume: bool = False) -> torch.Tensor:
    """deepbet's brain network (a 3-D LinkNet) on ``x`` (1 x 1 x D x H x W): its brain probability, D x H x W.

    The network's own ``forward``, step by step (deepbet 1.0.2's scripted graph), but for its first block
    (``_first_block``) and its output layer: a transposed convolution of kernel 2 and stride 2 (each output voxel
    from one input voxel) and a softmax over its two channels, run on ``CHUNK_SLICES`` slices of the last feature
    map at a time. Those two layers' full-size outputs and working buffers were most of a head's peak memory.
    The result equals ``network(x)[0, 1]`` to float precision (tested). With ``consume``, ``x``'s storage is
    released (resized to nothing) once the first block has read it, for a caller that has no more use for it.
    """
    relu = getattr(network.conv, "2")  # the graph passes one ReLU module to every block
    first = _first_block(network.init, x)
    if consume:
        x.untyped_storage().resize_(0)
    level1 = network.down0(relu, first)
    level2 = network.down1(relu, level1)
    level3 = network.down2(relu, level2)
    up = network.up0(relu, network.down3(relu, level3)) + level3
    up = network.up1(relu, up) + level2
    up = network.up2(relu, up) + level1
    up = network.up3(relu, up) + first
    del first, level1, level2, level3
    features = network.conv(network.tp_conv1(relu, up))
    del up
    depth = features.shape[2]
    probability = torch.empty((2 * depth, *[2 * n for n in features.shape[3:]]), dtype=features.dtype,
                              device=features.device)
    for start in range(0, depth, CHUNK_SLICES):
        logits = network.tp_conv2(features[:, :, start:start + CHUNK_SLICES])
        probability[2 * start:2 * (start + CHUNK_SLICES)] = torch.softmax(logits, 1)[0, 1]
    return probability


@torch.no_grad()
def brain_probability(data: np.ndarray, affine: np.ndarray, device: str = "cpu") -> np.ndarray:
    """deepbet's brain probability for a head volume, on the volume's own grid (float32 in [0, 1]).

    Args:
        data: the 3-D volume as stored.
        affine: its voxel-to-RAS affine.
        device: torch device of the networks.
    """
    box_network, brain_network, _ = _deepbet_networks(str(device))
    image, working = _working_image(data, affine)
    x = torch.from_numpy(sitk.GetArrayFromImage(working).transpose(2, 1, 0).copy()).to(device)
    geometry = working.GetSpacing(), working.GetOrigin(), working.GetDirection()
    del working  # its voxels are in x; the networks' peak memory comes later
    small = F.interpolate(x[None, None], BOX_SHAPE, mode="nearest-exact")[0, 0]
    low, high = torch.quantile(small.flatten(), torch.tensor(INTENSITY_QUANTILES, device=device))
    if not high > low:
        raise InputError("brain extraction: the volume has no contrast (its intensities are one value)")
    box = _box(box_network(_standardise(small, low, high)[None, None])[0, 1], x.shape)
    inside = F.interpolate(x[box][None, None], BRAIN_SHAPE, mode="nearest-exact")
    shape, box_shape = x.shape, x[box].shape
    del small, x
    brain = brain_network_probability(brain_network, _standardise(inside, low, high), consume=True)
    del inside
    probability = np.zeros(shape[::-1], np.float32)  # ITK's axis order
    inside_box = F.interpolate(brain[None, None], box_shape, mode="trilinear", align_corners=False)[0, 0]
    probability[box[::-1]] = inside_box.permute(2, 1, 0).cpu().numpy()
    del brain, inside_box
    working_probability = sitk.GetImageFromArray(probability)
    del probability
    for set_value, value in zip((working_probability.SetSpacing, working_probability.SetOrigin,
                                 working_probability.SetDirection), geometry):
        set_value(value)
    back = sitk.Resample(working_probability, image, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(back).transpose(2, 1, 0)


def _brain_mask(probability: np.ndarray, affine: np.ndarray, name: str) -> np.ndarray:
    """The largest piece of the thresholded probability, holes filled; refused when it is not one whole brain."""
    labels, count = ndimage.label(probability > PROBABILITY_THRESHOLD)
    ml = voxel_ml(affine)
    sizes = np.bincount(labels.ravel())[1:] * ml if count else np.zeros(0)
    if count == 0 or not BRAIN_ML_RANGE[0] <= sizes.max() <= BRAIN_ML_RANGE[1]:
        found = 0.0 if count == 0 else float(sizes.max())
        raise InputError(
            f"brain extraction on {name} found {found:.0f} mL of brain, outside the plausible "
            f"{BRAIN_ML_RANGE[0]:.0f}-{BRAIN_ML_RANGE[1]:.0f} mL: is it a head MRI of this sequence? (or give a "
            "skull-stripped volume with brain_extraction=never)"
        )
    order = np.argsort(sizes)[::-1]
    if count > 1 and sizes[order[1]] > MAX_OTHER_PIECES_ML:
        raise InputError(
            f"brain extraction on {name} found several large pieces ({sizes[order[0]]:.0f} mL and "
            f"{sizes[order[1]]:.0f} mL), not one brain: check the volume (or skull-strip it yourself)"
        )
    return ndimage.binary_fill_holes(labels == order[0] + 1)


def field_of_view_warnings(mask: np.ndarray, affine: np.ndarray, name: str) -> list[str]:
    """Warnings for a brain that reaches a face of the field of view other than the lowest (the brainstem leaves
    every scan there).

    Raises:
        InputError: the brain is cut off at the vertex (more than ``MAX_TOP_BRAIN_MM2`` on the top face).
    """
    affine = np.asarray(affine)
    spacing = nib.affines.voxel_sizes(affine)
    superior = affine[2, :3] / spacing  # how far up (RAS z) one voxel step along each axis goes, per mm
    warnings = []
    for axis in range(3):
        face_mm2 = float(np.prod(np.delete(spacing, axis)))
        for index in (0, mask.shape[axis] - 1):
            step_up = superior[axis] if index == mask.shape[axis] - 1 else -superior[axis]
            area = float(np.take(mask, index, axis=axis).sum()) * face_mm2
            if step_up < -0.5 or area <= EDGE_WARNING_MM2:  # the bottom face, or little brain on it
                continue
            where = f"{'first' if index == 0 else 'last'} plane along voxel axis {axis}"
            if step_up > 0.5 and area > MAX_TOP_BRAIN_MM2:
                raise InputError(
                    f"the brain in {name} runs off the top of the field of view ({area:.0f} mm^2 of brain on its "
                    f"{where}, more than {MAX_TOP_BRAIN_MM2:.0f}): the scan cuts the brain off at the vertex; segment "
                    "a scan that covers the whole brain"
                )
            warnings.append(f"the brain in {name} reaches the edge of the field of view ({area:.0f} mm^2 of brain on "
                            f"its {where}): a part of it may lie outside the scan and was not segmented")
    return warnings


def _on_grid(mask: np.ndarray, affine: np.ndarray, image: nib.spatialimages.SpatialImage) -> np.ndarray:
    """``mask`` (on ``affine``'s grid) on ``image``'s grid by world coordinates, grown by ``STRIP_MARGIN_MM`` so
    that registration after it still finds the sequence's whole brain."""
    reference = nifti_to_itk(mask.astype(np.float32), affine, "the brain mask")
    target = nifti_to_itk(np.zeros(image.shape[:3], np.float32), image.affine, "the sequence")
    moved = sitk.GetArrayFromImage(sitk.Resample(reference, target, sitk.Transform(), sitk.sitkLinear, 0.0))
    grown = moved.transpose(2, 1, 0) > 0.0
    radius = np.maximum(1, np.round(STRIP_MARGIN_MM / nib.affines.voxel_sizes(image.affine)).astype(int))
    return ndimage.binary_dilation(grown, np.ones(2 * radius + 1, bool)) if grown.any() else grown


def _strip(image: nib.spatialimages.SpatialImage, data: np.ndarray, mask: np.ndarray) -> nib.Nifti1Image:
    """The sequence with 0 outside ``mask`` (and no negative values inside: background is 0 in skull-stripped data)."""
    return nib.Nifti1Image(np.where(mask, np.maximum(data, 0.0), 0.0).astype(np.float32), image.affine)


def extract_brain(
    images: Mapping[str, nib.spatialimages.SpatialImage],
    sequences: Sequence[str],
    mode: str = "auto",
    device: str | torch.device = "cpu",
) -> tuple[dict[str, nib.spatialimages.SpatialImage], BrainExtraction]:
    """Strip the heads among ``sequences`` to the brain found on the reference (the first, the FLAIR).

    The brain is extracted once, on the reference when it is a head (or always); other heads are stripped with
    that brain, mapped onto their grid by world coordinates and grown by ``STRIP_MARGIN_MM`` (alignment then puts
    them onto the reference grid, and ``apply_brain`` gives every sequence the one mask). A reference that is a
    skull-stripped brain gives its nonzero voxels as the brain. Sequences missing or not finite are left for the
    input checks to name.

    Returns:
        the images (stripped where they were heads) and the record with the brain mask on the reference grid.

    Raises:
        InputError: the extraction did not find one whole brain inside the field of view.
    """
    if mode not in BRAIN_EXTRACTION_MODES:
        raise InputError(f"brain_extraction must be one of {BRAIN_EXTRACTION_MODES}, got {mode!r}")
    start = time.perf_counter()
    out = dict(images)
    present = [name for name in sequences if name in images]
    arrays = {name: as_3d(name, images[name]) for name in present}
    nonzero = {name: float(np.count_nonzero(arrays[name])) * voxel_ml(images[name].affine) for name in present}
    heads = {name for name in present if mode == "always" or (mode == "auto" and nonzero[name] > HEAD_MIN_NONZERO_ML)}
    if any(not np.isfinite(arrays[name]).all() for name in heads):
        heads = set()  # NaNs: the input checks name the sequence
    reference = sequences[0]
    if reference not in images:
        return out, BrainExtraction(mode, False, None, 0.0, {}, nonzero, 0.0, np.zeros(0, bool))
    ref_image, ref_data = images[reference], arrays[reference]
    done = {name: "used as it came" + (" (brain_extraction=never)" if mode == "never" else "") for name in present}
    method, warnings = None, []
    if reference in heads:
        release_free_memory()  # what earlier work left free in the heap: the extraction's buffers are not from it
        with mapped_large_buffers():  # its large buffers go back to the system when freed (anofpdm.runtime)
            probability = brain_probability(ref_data, ref_image.affine, str(device))
        mask = _brain_mask(probability, ref_image.affine, reference)
        del probability
        release_free_memory()  # the rest, before the method's own buffers
        warnings = field_of_view_warnings(mask, ref_image.affine, reference)
        method = _deepbet_networks(str(device))[2]
        out[reference] = _strip(ref_image, ref_data, mask)
        done[reference] = f"brain extracted ({method})"
    else:
        mask = ref_data > 0
    for name in sorted(heads - {reference}, key=present.index):
        image = images[name]
        on_grid = mask if same_grid(image, ref_image) else _on_grid(mask, ref_image.affine, image)
        out[name] = _strip(image, arrays[name], on_grid)
        done[name] = f"stripped with the brain of {reference}"
    brain_ml = float(mask.sum()) * voxel_ml(ref_image.affine)
    return out, BrainExtraction(mode, bool(heads), method, brain_ml, done, nonzero, time.perf_counter() - start, mask,
                                warnings)


def apply_brain(
    images: Mapping[str, nib.spatialimages.SpatialImage], extraction: BrainExtraction, sequences: Sequence[str]
) -> dict[str, nib.spatialimages.SpatialImage]:
    """After alignment: every sequence on the reference grid given the reference's brain (one mask on all, as in
    skull-stripped training data). Unchanged when nothing was extracted."""
    if not extraction.extracted:
        return dict(images)
    out = dict(images)
    for name in sequences[1:]:
        if name in images and images[name].shape[:3] == extraction.mask.shape:
            out[name] = _strip(images[name], as_3d(name, images[name]), extraction.mask)
    return out
