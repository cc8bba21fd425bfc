"""Synthetic BraTS-format cases on MNI152 anatomy (anofpdm.data.synth)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
import pytest

from anofpdm.data.brats import SEQUENCES, find_cases, load_case
from anofpdm.data.slices import prepare_dataset
from anofpdm.data.preview import render_preview
from anofpdm.data.domains import SHIFTED, TRAINING
from anofpdm.data.synth import (
    BENIGN_CODES,
    case_seed,
    generate_cases,
    is_healthy_index,
    synthesize_case,
    write_case,
)

SMALL = (60, 60, 39)  # the BraTS field of view at 4 mm
SMALL_MM = 4.0
LABELS = {0, 1, 2, 4}
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tumour_case():
    """The first enhancing tumour of run seed 7 (some tumours are non-enhancing by design)."""
    for index in range(10):
        case = synthesize_case(case_seed(7, index), healthy=False, shape=SMALL, voxel_mm=SMALL_MM)
        if case.info["tumour_type"] == "enhancing":
            return case
    raise AssertionError("no enhancing tumour among 10 cases")


def _brain(case) -> np.ndarray:
    return case.images["flair"] > 0


def test_small_case_is_valid(tumour_case) -> None:
    seg = tumour_case.seg
    assert seg.dtype == np.uint8 and set(np.unique(seg).tolist()) <= LABELS and seg.any()
    brain = _brain(tumour_case)
    assert 0.5 < brain.sum() * SMALL_MM**3 / 1e6 < 2.5  # litres of brain
    for name in SEQUENCES:
        image = tumour_case.images[name]
        assert image.shape == SMALL and image.dtype == np.int16
        np.testing.assert_array_equal(image > 0, brain)  # skull-stripped: exactly 0 outside the brain
    assert np.all(brain[seg > 0])
    expected_affine = np.diag([-SMALL_MM, -SMALL_MM, SMALL_MM, 1.0])
    expected_affine[1, 3] = (SMALL[1] - 1) * SMALL_MM
    np.testing.assert_array_equal(tumour_case.affine, expected_affine)


def test_small_case_info_matches_seg(tumour_case) -> None:
    voxel_ml = SMALL_MM**3 / 1000.0
    info = tumour_case.info
    assert info["tumour_volume_ml"] == pytest.approx(np.count_nonzero(tumour_case.seg) * voxel_ml)
    for label in ("1", "2", "4"):
        voxels = np.count_nonzero(tumour_case.seg == int(label))
        assert info["label_volumes_ml"][label] == pytest.approx(voxels * voxel_ml)


def test_relative_contrasts(tumour_case) -> None:
    seg, images = tumour_case.seg, tumour_case.images
    normal = _brain(tumour_case) & (seg == 0)
    oedema = seg == 2
    assert images["flair"][oedema].mean() > 1.3 * images["flair"][normal].mean()
    assert images["t2"][oedema].mean() > images["t2"][normal].mean()
    assert images["t1"][oedema].mean() < images["t1"][normal].mean()
    enhancing = seg == 4
    assert enhancing.any()
    assert images["t1ce"][enhancing].mean() > 1.3 * images["t1"][enhancing].mean()


def test_seed_determinism_and_variety(tumour_case) -> None:
    again = synthesize_case(tumour_case.info["seed"], healthy=False, shape=SMALL, voxel_mm=SMALL_MM)
    for name in SEQUENCES:
        np.testing.assert_array_equal(again.images[name], tumour_case.images[name])
    np.testing.assert_array_equal(again.seg, tumour_case.seg)
    other = synthesize_case(tumour_case.info["seed"] + 1, healthy=False, shape=SMALL, voxel_mm=SMALL_MM)
    assert not np.array_equal(other.seg, tumour_case.seg)
    assert not np.array_equal(other.images["flair"] > 0, tumour_case.images["flair"] > 0)


def test_healthy_case_has_empty_seg() -> None:
    case = synthesize_case(case_seed(7, 2), healthy=True, shape=SMALL, voxel_mm=SMALL_MM)
    assert not case.seg.any() and case.info["tumour_volume_ml"] == 0.0 and case.info["tumour_centre_voxel"] is None
    assert _brain(case).any()


def test_case_seed_and_healthy_spread() -> None:
    assert case_seed(3, 5) == case_seed(3, 5)
    assert len({case_seed(3, i) for i in range(50)}) == 50
    assert case_seed(3, 0) != case_seed(4, 0)
    assert [i for i in range(10) if is_healthy_index(i, 0.2)] == [4, 9]
    assert not any(is_healthy_index(i, 0.0) for i in range(10))
    assert all(is_healthy_index(i, 1.0) for i in range(10))
    with pytest.raises(ValueError, match="healthy_fraction"):
        is_healthy_index(0, 1.5)
    with pytest.raises(ValueError, match="non-negative"):
        case_seed(-1, 0)


def test_argument_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_cases"):
        generate_cases(tmp_path, 0, 1)
    with pytest.raises(ValueError, match="shape"):
        synthesize_case(1, False, shape=(4, 60, 60))
    for bad in ((0.0, 10.0), (50.0, 10.0), (10.0,), (10.0, float("inf")), (float("nan"), 10.0)):
        with pytest.raises(ValueError, match="tumour_volume_ml"):
            synthesize_case(1, False, shape=SMALL, voxel_mm=SMALL_MM, tumour_volume_ml=bad)
        with pytest.raises(ValueError, match="tumour_volume_ml"):
            generate_cases(tmp_path / "bad", 1, 1, tumour_volume_ml=bad)
    assert not (tmp_path / "bad").exists()


def test_tumour_volume_range_sets_the_tumour_size() -> None:
    """The same seed drawn from a small and a large fixed nominal volume: labelled volumes follow it."""
    volumes = {}
    for nominal in (10.0, 150.0):
        case = synthesize_case(case_seed(7, 0), healthy=False, shape=SMALL, voxel_mm=SMALL_MM,
                               tumour_volume_ml=(nominal, nominal))
        volumes[nominal] = case.info["tumour_volume_ml"]
    assert 5.0 < volumes[10.0] < 40.0  # the label adds oedema reach and irregularity to the nominal sphere
    assert volumes[150.0] > 4 * volumes[10.0]


def test_written_small_cases_feed_the_reader_preview_and_preparation(tmp_path: Path, tumour_case) -> None:
    healthy = synthesize_case(case_seed(7, 2), healthy=True, shape=SMALL, voxel_mm=SMALL_MM)
    data = tmp_path / "data"
    dirs = [write_case(tumour_case, data, "SYN_00000"), write_case(healthy, data, "SYN_00001")]
    (case, _) = find_cases(data)
    loaded = load_case(case)
    np.testing.assert_array_equal(loaded.mask, (tumour_case.seg > 0)[::-1, ::-1, :])
    png = render_preview(dirs, tmp_path / "preview.png")
    picture = plt.imread(png)
    assert picture.shape[1] == pytest.approx(2 * picture.shape[0], rel=0.05)  # 2 rows x 4 columns of tiles
    with pytest.raises(ValueError, match="empty"):
        render_preview([], tmp_path / "none.png")
    manifest = prepare_dataset(data, tmp_path / "slices", size=32, split=(0.5, 0.0, 0.5))
    assert manifest["skipped"] == []
    unhealthy = sum(manifest["splits"][s]["unhealthy"] for s in ("train", "test"))
    tumour_pixels = np.count_nonzero(tumour_case.seg, axis=(0, 1))
    assert np.count_nonzero(tumour_pixels >= 16) <= unhealthy <= np.count_nonzero(tumour_pixels)


@pytest.fixture(scope="module")
def full_size(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth")
    calls = []
    manifest = generate_cases(out, n_cases=1, seed=11, healthy_fraction=0.2, progress=lambda d, n: calls.append((d, n)))
    assert calls == [(1, 1)]
    return out, manifest


def test_full_size_case_on_the_brats_grid(full_size: tuple[Path, dict]) -> None:
    out, manifest = full_size
    assert json.loads((out / "manifest.json").read_text()) == manifest
    (entry,) = manifest["cases"]
    assert entry["case"] == "SYN_00000" and entry["healthy"] is False and entry["seed"] == case_seed(11, 0)
    brats_affine = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, 239.0], [0, 0, 1.0, 0], [0, 0, 0, 1]])
    images = {}
    for name in (*SEQUENCES, "seg"):
        image = nib.load(str(out / "SYN_00000" / f"SYN_00000_{name}.nii.gz"))
        assert image.shape == (240, 240, 155)
        np.testing.assert_array_equal(image.affine, brats_affine)
        assert image.header.get_zooms() == (1.0, 1.0, 1.0)
        images[name] = np.asarray(image.dataobj)
    assert images["seg"].dtype == np.uint8 and set(np.unique(images["seg"]).tolist()) <= LABELS
    assert entry["tumour_volume_ml"] == pytest.approx(np.count_nonzero(images["seg"]) / 1000.0)
    for label in ("1", "2", "4"):
        assert entry["label_volumes_ml"][label] == pytest.approx(np.count_nonzero(images["seg"] == int(label)) / 1000.0)
    assert np.all(images["flair"][images["seg"] > 0] > 0)
    brain = images["flair"] > 0
    assert not brain[0].any() and not brain[-1].any() and not brain[:, 0].any() and not brain[:, -1].any()


def test_parallel_generation_writes_the_same_cases(full_size: tuple[Path, dict], tmp_path: Path) -> None:
    out, manifest = full_size
    parallel = generate_cases(tmp_path, n_cases=2, seed=11, healthy_fraction=0.2, workers=2)
    assert parallel["cases"][0] == manifest["cases"][0] and parallel["cases"][1]["case"] == "SYN_00001"
    for name in (*SEQUENCES, "seg"):
        first = nib.load(str(out / "SYN_00000" / f"SYN_00000_{name}.nii.gz"))
        again = nib.load(str(tmp_path / "SYN_00000" / f"SYN_00000_{name}.nii.gz"))
        np.testing.assert_array_equal(np.asarray(again.dataobj), np.asarray(first.dataobj))
    assert (tmp_path / "studies" / "t2" / "SYN_00001.nii.gz").is_file()
    with pytest.raises(ValueError, match="workers"):
        generate_cases(tmp_path / "none", n_cases=1, seed=1, workers=0)
    assert not (tmp_path / "none").exists()


def test_full_size_studies_layout(full_size: tuple[Path, dict]) -> None:
    out, _ = full_size
    case = out / "SYN_00000"
    assert (out / "studies" / "SYN_00000.nii.gz").read_bytes() == (case / "SYN_00000_flair.nii.gz").read_bytes()
    assert (out / "studies" / "t2" / "SYN_00000.nii.gz").read_bytes() == (case / "SYN_00000_t2.nii.gz").read_bytes()


def test_demo_studies_are_a_monai_label_folder() -> None:
    studies = REPO / "demo" / "studies"
    flair = sorted(p.name for p in studies.glob("*.nii.gz"))
    assert len(flair) == 4  # three skull-stripped studies and one head
    assert sorted(p.name for p in (studies / "t2").glob("*.nii.gz")) == flair
    truth = sorted(p.name for p in (REPO / "demo" / "truth").glob("*_seg.nii.gz"))
    assert truth == [name.replace(".nii.gz", "_seg.nii.gz") for name in flair]
    head = nib.load(studies / "SYN_00003.nii.gz")
    head_ml = np.count_nonzero(np.asanyarray(head.dataobj)) * abs(np.linalg.det(head.affine[:3, :3])) / 1000.0
    assert head_ml > 2500.0 and (REPO / "demo" / "truth" / "SYN_00003_brainmask.nii.gz").is_file()  # a head
    # every user clones the demo: three 1 mm studies (10 MB) and the head at 1.5 mm (3.8 MB)
    assert sum(p.stat().st_size for p in (REPO / "demo").rglob("*") if p.is_file()) < 15 * 1024 * 1024


def test_shifted_domain_lies_outside_every_training_range() -> None:
    """The shifted test domain must not overlap what the model is trained on, range by range."""
    from anofpdm.data.domains import SHIFTED, TRAINING

    assert SHIFTED.zoom_range[1] > TRAINING.zoom_range[1] and SHIFTED.anisotropy_range[0] < TRAINING.anisotropy_range[0]
    assert SHIFTED.rotation_sd_deg > TRAINING.rotation_sd_deg and SHIFTED.translation_mm > TRAINING.translation_mm
    assert SHIFTED.deformation_sd_mm > TRAINING.deformation_sd_mm
    assert SHIFTED.deformation_control_mm < TRAINING.deformation_control_mm
    for name in ("ventricle_expansion", "cortical_atrophy", "bias_amplitude", "blur_sigma_mm", "noise_fraction"):
        assert getattr(SHIFTED, name)[1] > getattr(TRAINING, name)[1], name
    assert SHIFTED.tissue_jitter > TRAINING.tissue_jitter and SHIFTED.scanner_gain != TRAINING.scanner_gain
    assert SHIFTED.tumour_volume_ml[0] < TRAINING.tumour_volume_ml[0] and not TRAINING.grids
    assert {grid.name for grid in SHIFTED.grids} >= {"ras_1mm", "axial_thick", "oblique_1p2mm", "sagittal_3d"}


def test_shifted_cases_differ_in_anatomy_and_land_on_their_grids() -> None:
    from anofpdm.data.domains import SHIFTED, TRAINING, grid_affine
    from anofpdm.data.synth import reslice_case

    seed = case_seed(3, 1)
    training = synthesize_case(seed, healthy=False, shape=SMALL, voxel_mm=SMALL_MM, domain=TRAINING)
    shifted = synthesize_case(seed, healthy=False, shape=SMALL, voxel_mm=SMALL_MM, domain=SHIFTED)
    assert shifted.info["domain"] == "shifted" and "domain" not in training.info
    assert 0.0 < shifted.info["cortical_atrophy"] and SHIFTED.scanner_gain[0] <= shifted.info["scanner_gain"]
    assert not np.array_equal(_brain(training), _brain(shifted))
    volume_ml = np.count_nonzero(shifted.seg) * SMALL_MM**3 / 1000.0
    for index, grid in enumerate(SHIFTED.grids):
        moved = reslice_case(shifted, SHIFTED, index)
        assert moved.info["grid"] == grid.name and moved.seg.shape == grid.shape
        assert all(image.shape == grid.shape and image.dtype == np.int16 for image in moved.images.values())
        assert set(np.unique(moved.seg).tolist()) <= LABELS
        # the tumour keeps its size in millimetres on every grid (nearest-neighbour resampling of the labels)
        assert moved.info["tumour_volume_ml"] == pytest.approx(volume_ml, rel=0.25)
        centre = (shifted.affine @ np.append((np.asarray(SMALL) - 1) / 2.0, 1.0))[:3]
        assert np.allclose(moved.affine, grid_affine(grid, centre))
        tumour_ras = moved.affine @ np.append(moved.info["tumour_centre_voxel"], 1.0)
        source_ras = shifted.affine @ np.append(shifted.info["tumour_centre_voxel"], 1.0)
        assert np.linalg.norm(tumour_ras[:3] - source_ras[:3]) < 2 * SMALL_MM  # same place in scanner space
    assert reslice_case(training, TRAINING, 0) is training


def test_unknown_domain_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown domain 'colour'"):
        generate_cases(tmp_path / "x", 1, 0, domain="colour")


# SHA-256 (first 16 hex digits) of the four sequences and the seg of case_seed(7, 0) on SMALL, computed with the code
# before the clinical benign findings (commit 98ccb8c): the default generator must keep every recorded figure's data.
BASIC_DIGESTS = {("training", False): "f22509298c4896c5", ("training", True): "1cd925a3aeabb3e7",
                 ("shifted", False): "91213507317d0019", ("shifted", True): "28aa021ab36d2d18"}


def _digest(case) -> str:
    h = hashlib.sha256()
    for name in SEQUENCES:
        h.update(np.ascontiguousarray(case.images[name]).tobytes())
    h.update(case.seg.tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("domain", [TRAINING, SHIFTED], ids=["training", "shifted"])
def test_default_benign_findings_keep_the_cases_bit_identical(domain) -> None:
    for healthy in (False, True):
        default = synthesize_case(case_seed(7, 0), healthy, shape=SMALL, voxel_mm=SMALL_MM, domain=domain)
        assert _digest(default) == BASIC_DIGESTS[domain.name, healthy]
        assert default.benign is None and "benign_findings" not in default.info
        assert "periventricular_gain" in default.info and "white_matter_hyperintensities" in default.info
        basic = synthesize_case(case_seed(7, 0), healthy, shape=SMALL, voxel_mm=SMALL_MM, domain=domain,
                                benign_findings="basic")
        assert _digest(basic) == _digest(default)


@pytest.fixture(scope="module")
def clinical_cases() -> dict:
    """Clinical findings on six SMALL cases per domain (odd indices healthy), with the basic case of each seed."""
    cases = {}
    for domain in (TRAINING, SHIFTED):
        for index in range(6):
            kwargs = dict(shape=SMALL, voxel_mm=SMALL_MM, domain=domain)
            healthy = index % 2 == 1
            cases[domain.name, index] = (synthesize_case(case_seed(7, index), healthy, benign_findings="clinical",
                                                         **kwargs),
                                         synthesize_case(case_seed(7, index), healthy, **kwargs))
    return cases


def test_clinical_findings_lie_outside_the_tumour_and_are_labelled_healthy(clinical_cases) -> None:
    codes = set(BENIGN_CODES.values())
    seen = set()
    for (domain, index), (clinical, basic) in clinical_cases.items():
        benign = clinical.benign
        assert benign.dtype == np.uint8 and benign.shape == SMALL and set(np.unique(benign).tolist()) <= codes | {0}
        assert not (benign.astype(bool) & (clinical.seg > 0)).any()  # outside the tumour, seg 0 on every finding
        assert np.all(_brain(clinical)[benign > 0])
        # only the findings' own stream differs: same anatomy, tumour and seg as the basic case of the seed
        np.testing.assert_array_equal(clinical.seg, basic.seg)
        np.testing.assert_array_equal(_brain(clinical), _brain(basic))
        info = clinical.info["benign_findings"]
        assert info["model"] == "clinical" and 0 <= info["fazekas_deep"] <= info["fazekas_periventricular"] <= 3
        assert "periventricular_gain" not in clinical.info
        volumes = {name: np.count_nonzero(benign == code) * SMALL_MM**3 / 1000.0 for name, code in BENIGN_CODES.items()}
        assert info["volumes_ml"] == pytest.approx({name: v for name, v in volumes.items() if v > 0})
        if benign.any():
            seen.add(domain)
            bright = np.isin(benign, [code for name, code in BENIGN_CODES.items() if name != "lacune"])
            normal_wm = _brain(clinical) & (benign == 0) & (clinical.seg == 0)
            # brighter on FLAIR than the rest of the brain, and than the same voxels in the basic case
            assert clinical.images["flair"][bright].mean() > 1.1 * np.median(clinical.images["flair"][normal_wm])
            assert clinical.images["flair"][bright].mean() > basic.images["flair"][bright].mean()
            assert clinical.images["t2"][bright].mean() > basic.images["t2"][bright].mean()  # bright on T2 too
    assert seen == {"training", "shifted"}


def test_clinical_findings_are_deterministic_and_vary(clinical_cases) -> None:
    clinical, _ = clinical_cases["shifted", 0]
    again = synthesize_case(case_seed(7, 0), False, shape=SMALL, voxel_mm=SMALL_MM, domain=SHIFTED,
                            benign_findings="clinical")
    np.testing.assert_array_equal(again.benign, clinical.benign)
    for name in SEQUENCES:
        np.testing.assert_array_equal(again.images[name], clinical.images[name])
    grades = {c.info["benign_findings"]["fazekas_periventricular"] for c, _ in clinical_cases.values()}
    assert len(grades) >= 3
    with pytest.raises(ValueError, match="benign_findings"):
        synthesize_case(1, True, shape=SMALL, voxel_mm=SMALL_MM, benign_findings="many")


def test_findings_map_is_written_resliced_and_ignored_by_the_readers(tmp_path: Path) -> None:
    manifest = generate_cases(tmp_path / "data", 2, 7, healthy_fraction=0.5, domain="shifted",
                              tumour_volume_ml=(20.0, 20.0), benign_findings="clinical")
    assert manifest["benign_findings"] == "clinical" and manifest["benign_codes"] == BENIGN_CODES
    for entry, grid in zip(manifest["cases"], SHIFTED.grids):
        path = tmp_path / "data" / entry["case"] / f"{entry['case']}_benign.nii.gz"
        benign, seg = nib.load(path), nib.load(path.with_name(f"{entry['case']}_seg.nii.gz"))
        assert benign.shape == grid.shape and np.allclose(benign.affine, seg.affine)
        labels = np.asarray(benign.dataobj)
        assert labels.dtype == np.uint8 and not (labels.astype(bool) & (np.asarray(seg.dataobj) > 0)).any()
        expected = {name: round(np.count_nonzero(labels == code) * float(np.prod(grid.spacing_mm)) / 1000.0, 3)
                    for name, code in BENIGN_CODES.items() if np.any(labels == code)}
        assert entry["benign_findings"]["volumes_ml"] == expected
    cases = find_cases(tmp_path / "data")
    assert [sorted(c.images) for c in cases] == [sorted(SEQUENCES)] * 2  # the map is no sequence
    assert all(c.seg.name.endswith("_seg.nii.gz") for c in cases)
    load_case(cases[0])
    prepared = prepare_dataset(tmp_path / "data", tmp_path / "slices", size=32, split=(0.5, 0.0, 0.5))
    assert prepared["skipped"] == []
    assert sorted(p.name for p in (tmp_path / "data" / "studies").glob("*.nii.gz")) == ["SYN_00000.nii.gz",
                                                                                         "SYN_00001.nii.gz"]
