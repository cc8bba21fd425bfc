"""The periventricular findings: the ventricles found on the FLAIR, and which lesions line them."""

import nibabel as nib
import numpy as np
import pytest

from anofpdm.method.periventricular import PeriventricularRule, find_ventricles, periventricular_lesions
from anofpdm.method.pipeline import (
    InferenceOptions,
    InputError,
    LesionEdges,
    PeriventricularFilter,
    finish_on_input_grid,
)
from anofpdm.volumes.slicing import to_model_grid, to_model_slices

SPACING = (1.0, 1.0, 2.0)
TISSUE, FLUID, BRIGHT = 100.0, 25.0, 160.0


def _ellipsoid(shape, centre_mm, radii_mm, spacing=SPACING):
    axes = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, spacing)), indexing="ij")
    return sum(((a - c) / r) ** 2 for a, c, r in zip(axes, centre_mm, radii_mm)) <= 1.0


@pytest.fixture(scope="module")
def head():
    """A brain (an ellipsoid, 1 x 1 x 2 mm voxels) with two deep ventricles and a fluid-filled sulcus at its edge;
    returns the FLAIR, the brain and the named regions."""
    shape = (140, 160, 70)
    brain = _ellipsoid(shape, (70, 80, 70), (62, 75, 60))
    ventricles = _ellipsoid(shape, (58, 80, 72), (5, 22, 9)) | _ellipsoid(shape, (82, 80, 72), (5, 22, 9))
    sulcus = _ellipsoid(shape, (70, 6, 70), (10, 6, 20)) & brain  # fluid at the brain's front, none of it deep
    flair = np.where(brain, TISSUE, 0.0)
    flair[ventricles | sulcus] = FLUID
    regions = {"ventricles": ventricles, "sulcus": sulcus}
    # a halo 3 mm thick around the upper half of the left ventricle: thin and periventricular (the ventricular
    # system runs on below it, as the third ventricle does below real halos)
    upper = np.arange(shape[2])[None, None, :] * SPACING[2] >= 72
    regions["halo"] = _ellipsoid(shape, (58, 80, 72), (8, 25, 12)) & ~ventricles & upper
    # a tumour (radius 14 mm) touching the right ventricle: within 10 mm of it in part, but a mass
    regions["tumour"] = _ellipsoid(shape, (101, 80, 72), (14, 14, 14)) & ~ventricles
    # a lining of the right ventricle 4 mm from that tumour: beside a tumour, perhaps its spread
    regions["spread"] = (_ellipsoid(shape, (82, 80, 72), (8, 25, 12)) & ~ventricles & upper
                         & ~_ellipsoid(shape, (101, 80, 72), (18, 18, 18)))
    # a thin lesion against the sulcus's fluid, far from the ventricles
    regions["cortical"] = _ellipsoid(shape, (70, 18, 70), (12, 3, 12)) & brain & ~sulcus
    # a cystic tumour: a thin bright rim around its own fluid, away from the ventricles
    cyst = _ellipsoid(shape, (70, 132, 70), (9, 9, 9))
    regions["cystic"] = _ellipsoid(shape, (70, 132, 70), (13, 13, 13))
    for name in ("halo", "tumour", "spread", "cortical", "cystic"):
        flair[regions[name]] = BRIGHT
    flair[cyst] = FLUID
    return flair, brain, regions


def test_the_ventricles_are_the_deep_fluid_not_the_sulci(head):
    flair, brain, regions = head
    found, level = find_ventricles(flair, brain, SPACING)
    # the two ventricles apart, and the cystic tumour's fluid (deep and large): a lesion's own, not a ventricle, is
    # told by the lesion that holds it (below)
    assert FLUID < level < TISSUE and set(np.unique(found)) == {0, 1, 2, 3}
    found = found > 0
    coarse = regions["ventricles"][::2, ::2, ::1]
    assert found.shape == coarse.shape
    cyst = (flair == FLUID) & regions["cystic"]
    assert (found & coarse).sum() >= 0.8 * coarse.sum() and not (found & ~coarse & ~cyst[::2, ::2, ::1]).any()
    assert not (found & regions["sulcus"][::2, ::2, ::1]).any()
    assert not find_ventricles(np.where(brain, TISSUE, 0.0), brain, SPACING)[0].any()  # no fluid: no ventricles


def test_thin_lesions_lining_the_ventricles_are_findings_and_masses_are_not(head):
    flair, brain, regions = head
    mask = regions["halo"] | regions["tumour"] | regions["spread"] | regions["cortical"] | regions["cystic"]
    findings = periventricular_lesions(mask, flair, brain, SPACING, PeriventricularRule())
    assert (findings == regions["halo"]).all()
    # the lining beside the tumour is a finding only when no margin is kept around tumours
    apart = periventricular_lesions(mask, flair, brain, SPACING, PeriventricularRule(tumour_margin_mm=2))
    assert (apart == (regions["halo"] | regions["spread"])).all()
    # the tumour reaches the ventricle: with a share it passes, the thickness test alone keeps it
    near = periventricular_lesions(mask, flair, brain, SPACING, PeriventricularRule(share=0.05))
    assert (near == regions["halo"]).all()
    thick = periventricular_lesions(mask, flair, brain, SPACING, PeriventricularRule(share=0.05, max_thickness_mm=40))
    assert thick[regions["tumour"]].all() and not thick[regions["cortical"]].any()
    # without ventricles nothing is a finding
    assert not periventricular_lesions(mask, np.where(brain, TISSUE, 0.0), brain, SPACING,
                                       PeriventricularRule()).any()


def test_rule_and_inputs_are_checked(head):
    flair, brain, _ = head
    for bad in ({"reach_mm": 0}, {"share": 0}, {"share": 1.5}, {"max_thickness_mm": -1}, {"tumour_margin_mm": -1}):
        with pytest.raises(ValueError):
            PeriventricularRule(**bad)
    with pytest.raises(ValueError, match="differ in shape"):
        periventricular_lesions(np.zeros((3, 3, 3), bool), flair, brain, SPACING, PeriventricularRule())


def test_the_pipeline_leaves_the_findings_out_of_the_mask_and_lists_them(head):
    flair, brain, regions = head
    affine = np.diag([*SPACING, 1.0])
    images = {name: nib.Nifti1Image((flair * scale).astype(np.float32), affine)
              for name, scale in (("flair", 1.0), ("t2", 2.0))}
    _, geometry, _ = to_model_slices(images, ("flair", "t2"), 128, 240.0)  # 1.875 mm pixels
    lesions = regions["halo"] | regions["tumour"]
    candidate = to_model_grid(lesions.astype(np.float32), geometry).transpose(1, 2, 0) >= 0.5
    edges = LesionEdges(flair, brain, max(geometry.spacing_mm[:2]))
    kept = finish_on_input_grid(candidate.astype(np.float32), candidate, geometry, 500.0, edges=edges)
    left_out = finish_on_input_grid(candidate.astype(np.float32), candidate, geometry, 500.0, edges=edges,
                                    periventricular=PeriventricularFilter(flair, brain))
    assert kept.labels[regions["halo"]].mean() > 0.8 and not kept.periventricular_findings
    assert kept.periventricular_mask is None
    assert not left_out.labels[regions["halo"]].any() and left_out.labels[regions["tumour"]].mean() > 0.9
    assert len(left_out.lesions) == 1 and len(left_out.periventricular_findings) == 1
    assert np.array_equal(left_out.periventricular_mask, (kept.labels > 0) & (left_out.labels == 0))
    halo_ml, ventricles_ml = (regions[name].sum() * np.prod(SPACING) / 1000.0 for name in ("halo", "ventricles"))
    # the finding as masked: the halo and the fluid it rings in the axial planes (filled as a lesion's holes are)
    assert halo_ml < left_out.periventricular_findings[0]["volume_ml"] < halo_ml + ventricles_ml / 2
    assert InferenceOptions().periventricular_findings == "leave-out"
    with pytest.raises(InputError, match="periventricular_findings"):
        InferenceOptions(periventricular_findings="drop")
