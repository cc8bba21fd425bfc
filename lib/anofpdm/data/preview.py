"""A PNG of synthetic (or any BraTS-layout) cases: FLAIR, T2 and T1ce through each tumour, truth overlaid."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from anofpdm.data.synth import LABEL_ENHANCING, LABEL_NECROTIC, LABEL_OEDEMA

__all__ = ["render_preview"]

PREVIEW_COLUMNS = ("flair", "t2", "t1ce")
PREVIEW_WINDOW_PERCENTILE = 99.5
PREVIEW_TILE_INCHES = 3.0
PREVIEW_DPI = 80
PREVIEW_LABEL_COLOURS = {
    LABEL_NECROTIC: (1.0, 0.2, 0.2),
    LABEL_OEDEMA: (0.2, 0.9, 0.2),
    LABEL_ENHANCING: (1.0, 0.9, 0.1),
}
PREVIEW_OVERLAY_ALPHA = 0.45


def _axial_for_display(volume: np.ndarray, z: int) -> np.ndarray:
    """RAS axial plane in radiological display order (anterior up, patient right on the left)."""
    return volume[::-1, :, z].T[::-1]


def _preview_slice(mask: np.ndarray, brain: np.ndarray) -> int:
    """Axial index through the tumour centre, or through the middle of the brain when healthy."""
    source = mask if mask.any() else brain
    z = np.nonzero(source.any(axis=(0, 1)))[0]
    weights = source.sum(axis=(0, 1))[z] if mask.any() else np.ones(len(z))
    return int(round(float(np.average(z, weights=weights))))


def _overlay(flair: np.ndarray, seg: np.ndarray, vmax: float) -> np.ndarray:
    grey = np.clip(flair / vmax, 0.0, 1.0)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    for label, colour in PREVIEW_LABEL_COLOURS.items():
        hit = seg == label
        rgb[hit] = (1 - PREVIEW_OVERLAY_ALPHA) * rgb[hit] + PREVIEW_OVERLAY_ALPHA * np.asarray(colour)
    return rgb


def render_preview(case_dirs: Sequence[Path], out_png: Path) -> Path:
    """Draw one row per case: FLAIR, T2, T1ce and FLAIR with the seg overlaid, on one axial slice.

    The slice goes through the tumour centre (mid-brain for a healthy case); images are shown in the
    radiological convention (patient right on the left).

    Args:
        case_dirs: BraTS-layout case folders (e.g. ``out_dir/SYN_00000``).
        out_png: the PNG to write.

    Returns:
        ``out_png``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from anofpdm.data.brats import find_case, load_case

    if not case_dirs:
        raise ValueError("case_dirs is empty: nothing to preview")
    columns = (*PREVIEW_COLUMNS, "seg")
    figsize = (PREVIEW_TILE_INCHES * len(columns), PREVIEW_TILE_INCHES * len(case_dirs))
    figure, axes = plt.subplots(len(case_dirs), len(columns), squeeze=False, figsize=figsize)
    for row, case_dir in zip(axes, case_dirs):
        case = find_case(Path(case_dir))
        if case is None:
            raise ValueError(f"no BraTS case files in {case_dir}")
        volume = load_case(case, PREVIEW_COLUMNS)
        brain = volume.images["flair"] > 0
        z = _preview_slice(volume.mask, brain)
        windows = {s: float(np.percentile(a[brain], PREVIEW_WINDOW_PERCENTILE)) for s, a in volume.images.items()}
        for ax, name in zip(row, columns):
            if name == "seg":
                seg = nib.as_closest_canonical(nib.load(str(case.seg))).get_fdata().astype(np.uint8)
                flair = _axial_for_display(volume.images["flair"], z)
                ax.imshow(_overlay(flair, _axial_for_display(seg, z), windows["flair"]))
            else:
                ax.imshow(_axial_for_display(volume.images[name], z), cmap="gray", vmin=0.0, vmax=windows[name])
            ax.set_title(f"{case.case_id} {name} z={z}", fontsize=8)
            ax.axis("off")
    figure.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, dpi=PREVIEW_DPI)
    plt.close(figure)
    return out_png
