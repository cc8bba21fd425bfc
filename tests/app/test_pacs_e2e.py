"""End to end on a PACS: Orthanc from the Debian packages, MONAI Label on its DICOMweb URL, offline.

Orthanc (``orthanc`` + ``orthanc-dicomweb``, which ``.ci/run`` installs) runs from a generated configuration
in a temporary folder, on free ports, without authentication and accepting local clients only. The studies
are small synthetic FLAIR/T2 pairs written as DICOM MR series by ``anofpdm.volumes.dicom`` and stored over STOW-RS.
MONAI Label starts with ``--studies <orthanc>/dicom-web`` and a dead HTTP(S) proxy for everything but
127.0.0.1, so any download at startup would fail it. The model is the tiny random-weight network whose
calibration flags every slice (``unhealthy_model``), so masks are not empty.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
import SimpleITK as sitk
from anofpdm.volumes.dicom import SERIES_DESCRIPTIONS, write_series, write_study
from anofpdm.volumes.reading import read_volume
from anofpdm.evaluation.metrics import dice
from conftest import APP_DIR, Server, free_port, make_volume_pair, wait_until_answering
from dicomweb_client import DICOMwebClient
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException
from pydicom import dcmread

sys.path.insert(0, str(APP_DIR))  # the app's own package `lib`, as `monailabel start_server` imports it
from lib.pacs import PACSDatastore  # noqa: E402

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGINS = (Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),
                    *sorted(Path("/usr/lib/orthanc").glob("libOrthancDicomWeb.so*")))
SEARCH_FILTER = {"Modality": "MR"}
AFFINE = np.diag([-4.0, -4.0, 5.0, 1.0])
SHAPE = (40, 44, 12)
# the paper's rule with unhealthy_model's c* masks a quantile of every slice: lesions for the mechanics to handle
SHOW_LESIONS = {"median_kernel": 1, "min_lesion_mm3": 0, "decision_rule": "paper"}
DEAD_PROXY = "http://127.0.0.1:9"  # nothing listens there: a download attempt fails at once


class Orthanc:
    """Orthanc with the DICOMweb plugin on free ports, its configuration and storage in ``folder``."""

    def __init__(self, folder: Path) -> None:
        plugin = next((p for p in DICOMWEB_PLUGINS if p.is_file()), None)
        if plugin is None or not Path(ORTHANC).is_file():
            raise FileNotFoundError(f"Orthanc or its DICOMweb plugin is missing ({ORTHANC}, {DICOMWEB_PLUGINS}): "
                                    "apt-get install -y orthanc orthanc-dicomweb")
        self.http_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb = f"{self.url}/dicom-web"
        self.config = folder / "orthanc.json"
        self.log_path = folder / "orthanc.log"
        self.config.write_text(json.dumps({
            "Name": "anofpdm-test", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
            "HttpPort": self.http_port, "DicomPort": free_port(), "DicomAet": "ANOFPDMTEST",
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "Plugins": [str(plugin)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }, indent=2))
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        """Start and poll ``/system`` until Orthanc answers (bounded)."""
        with open(self.log_path, "a") as log:
            self.process = subprocess.Popen([ORTHANC, str(self.config)], stdout=log, stderr=subprocess.STDOUT)
        wait_until_answering(f"{self.url}/system", self.process, "Orthanc", self.log_path.read_text)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)


def store(client: DICOMwebClient, folder: Path) -> None:
    """STOW-RS every file of a series folder."""
    client.store_instances([dcmread(path) for path in sorted(folder.glob("*.dcm"))])


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory, unhealthy_model: Path) -> dict:
    root = tmp_path_factory.mktemp("pacs").resolve()
    (root / "orthanc").mkdir()
    orthanc = Orthanc(root / "orthanc")
    pair = make_volume_pair(SHAPE, AFFINE, seed=0)
    nifti = root / "nifti"
    nifti.mkdir()
    for name, image in pair.items():
        nib.save(image, nifti / f"brain_{name}.nii.gz")
    dicom = root / "dicom"
    brain = write_study(pair, dicom / "brain", "PACS_BRAIN")
    ct = write_series(pair["flair"], dicom / "brain" / "CT", brain, "HEAD CT", 3, modality="CT")
    t2_flair = write_series(pair["flair"], dicom / "brain" / "T2_FLAIR", brain, "AX T2 FLAIR", 4)  # a FLAIR
    alone = write_study({"flair": pair["flair"]}, dicom / "alone", "PACS_ALONE")
    twice = write_study(pair, dicom / "twice", "PACS_TWICE")
    repeat = write_series(pair["t2"], dicom / "twice" / "repeat", twice, "AX T2 repeat", 3)
    workdir = root / "server"
    workdir.mkdir()
    cache = root / "cache"
    for folder in ("model", "logs", "bin"):  # see test_server_e2e: start_server's check-then-makedirs
        (APP_DIR / folder).mkdir(exist_ok=True)
    with ExitStack() as stack:
        orthanc.start()
        stack.callback(orthanc.stop)
        client = DICOMwebClient(orthanc.dicomweb)
        for folder in sorted(p.parent for p in dicom.rglob("0001.dcm")):
            store(client, folder)
        env = {"MONAI_LABEL_DICOMWEB_SEARCH_FILTER": json.dumps(SEARCH_FILTER),
               "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(cache),
               "HTTP_PROXY": DEAD_PROXY, "HTTPS_PROXY": DEAD_PROXY, "http_proxy": DEAD_PROXY,
               "https_proxy": DEAD_PROXY, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
        server = Server.start(orthanc.dicomweb, unhealthy_model, workdir, env)
        stack.callback(server.stop)
        server.wait_ready()
        yield {"orthanc": orthanc, "server": server, "pair": pair, "nifti": nifti, "brain": brain, "ct": ct,
               "t2_flair": t2_flair, "alone": alone, "twice": twice, "repeat": repeat, "cache": cache}


def infer(url: str, image: str, params: dict | None = None) -> requests.Response:
    return requests.post(f"{url}/infer/anofpdm", params={"image": image},
                         data={"params": json.dumps({**SHOW_LESIONS, **(params or {})})}, timeout=300)


def test_server_starts_offline_and_lists_the_mr_series(pacs):
    server, brain = pacs["server"], pacs["brain"]
    log = server.log()
    assert "DICOM SEG written with pydicom-seg" in log and "nothing is downloaded" in log
    assert not any((APP_DIR / "bin").glob("itkimage2segimage*"))
    assert "anofpdm" in requests.get(f"{server.url}/info/", timeout=10).json()["models"]
    picked = {requests.post(f"{server.url}/activelearning/random", timeout=30).json()["id"] for _ in range(8)}
    mr_series = {*brain.series_uids.values(), pacs["t2_flair"], *pacs["alone"].series_uids.values(),
                 *pacs["twice"].series_uids.values(), pacs["repeat"]}
    assert picked and picked <= mr_series  # the CT series is not offered


def test_infer_on_the_flair_series_uses_the_t2_of_its_study(pacs, tmp_path):
    server, brain, pair = pacs["server"], pacs["brain"], pacs["pair"]
    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
    label_file, result = client.infer("anofpdm", brain.series_uids["flair"], dict(SHOW_LESIONS))
    assert result["series"] == {"flair": brain.series_uids["flair"], "t2": brain.series_uids["t2"]}
    assert SERIES_DESCRIPTIONS["t2"] in result["inputs"]["t2"]
    for name, series in result["series"].items():  # both read from MONAI Label's DICOMweb cache
        assert result["inputs"][name].endswith(str(next(pacs["cache"].rglob(f"{series}.nii.gz"))))
    label = nib.load(label_file)
    assert label.shape == pair["flair"].shape
    np.testing.assert_allclose(label.affine, pair["flair"].affine, atol=1e-4)  # the FLAIR series' grid
    mask = np.asanyarray(label.dataobj) > 0

    nifti = pacs["nifti"]
    reference_file, reference = client.infer("anofpdm", "", {"t2": str(nifti / "brain_t2.nii.gz"), **SHOW_LESIONS},
                                             file=str(nifti / "brain_flair.nii.gz"))
    reference_mask = np.asanyarray(nib.load(reference_file).dataobj) > 0
    assert reference_mask.any()
    assert dice(mask, reference_mask) >= 0.8

    cached = next(pacs["cache"].rglob(f"{brain.series_uids['t2']}.nii.gz"))  # converted once, then reused
    stamp = cached.stat().st_mtime_ns
    _, again = client.infer("anofpdm", brain.series_uids["flair"], dict(SHOW_LESIONS))
    assert again["series"] == result["series"] and cached.stat().st_mtime_ns == stamp


def test_submit_label_stores_a_dicom_seg_read_back_through_the_datastore(pacs, tmp_path):
    server, brain, orthanc = pacs["server"], pacs["brain"], pacs["orthanc"]
    flair = brain.series_uids["flair"]
    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
    label_file, _ = client.infer("anofpdm", flair, dict(SHOW_LESIONS))
    label = nib.load(label_file)
    values = np.asanyarray(label.dataobj)
    assert (values > 0).any()
    label_info = [{"name": "tumour", "idx": 1}, {"name": "tumour (uncertain)", "idx": 2}]
    submitted = tmp_path / "label.nrrd"  # 3D Slicer submits its segmentation as NRRD
    sitk.WriteImage(sitk.ReadImage(label_file), str(submitted))
    client.save_label(flair, str(submitted), tag="final", params={"label_info": label_info})

    dicomweb = DICOMwebClient(orthanc.dicomweb)
    segs = dicomweb.search_for_series(search_filters={"Modality": "SEG", "StudyInstanceUID": brain.study_uid})
    assert len(segs) == 1
    seg_uid = segs[0]["0020000E"]["Value"][0]
    seg = dicomweb.retrieve_series(brain.study_uid, seg_uid)[0]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == flair and seg.SeriesDescription == "AnoFPDM"
    assert seg.FrameOfReferenceUID == brain.frame_of_reference_uid
    empty = tmp_path / "empty.nrrd"  # a healthy verdict's empty label: nothing to store as a SEG, a 422
    sitk.WriteImage(sitk.ReadImage(label_file) * 0, str(empty))
    with pytest.raises(MONAILabelClientException, match="Status: 422.*the label for series .* is empty"):
        client.save_label(flair, str(empty), tag="final", params={"label_info": label_info})
    assert len(dicomweb.search_for_series(search_filters={"Modality": "SEG"})) == 1
    client.save_label(flair, str(submitted), tag="final", params={"label_info": label_info})  # submitted again:
    again = dicomweb.search_for_series(search_filters={"Modality": "SEG"})  # a second SEG, the first kept
    assert len(again) == 2 and seg_uid in {s["0020000E"]["Value"][0] for s in again}
    named = {int(s.SegmentNumber): s.SegmentLabel for s in seg.SegmentSequence}
    assert named == {value: info["name"] for info in label_info for value in [info["idx"]] if (values == value).any()}

    # a datastore with an empty cache, as a training run would read the labelled series from the PACS
    fresh = PACSDatastore(DICOMwebClient(orthanc.dicomweb), SEARCH_FILTER, cache_path=str(tmp_path / "cache"))
    datalist = fresh.datalist()
    assert [Path(item["image"]).name for item in datalist] == [f"{flair}.nii.gz"]
    back = nib.as_closest_canonical(read_volume(Path(datalist[0]["label"]), "label"))  # NRRD from pydicom-seg
    label = nib.as_closest_canonical(label)
    np.testing.assert_allclose(back.affine, label.affine, atol=1e-4)
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), np.asanyarray(label.dataobj))


def test_bad_series_are_clear_errors(pacs):
    url, brain, twice = pacs["server"].url, pacs["brain"], pacs["twice"]
    alone = pacs["alone"]
    response = infer(url, alone.series_uids["flair"])
    assert response.status_code == 422
    assert alone.study_uid in response.text and "no MR series is named T2" in response.text

    response = infer(url, twice.series_uids["flair"])
    assert response.status_code == 422
    assert "2 series fit equally" in response.text and "t2_series" in response.text
    assert twice.series_uids["t2"] in response.text and pacs["repeat"] in response.text
    chosen = infer(url, twice.series_uids["flair"], {"t2_series": pacs["repeat"]})
    assert chosen.status_code == 200, chosen.text

    for t2_series in (pacs["ct"], brain.series_uids["flair"], alone.series_uids["flair"]):
        response = infer(url, brain.series_uids["flair"], {"t2_series": t2_series})
        assert response.status_code == 422 and "is not another MR series of study" in response.text
    response = infer(url, pacs["ct"])
    assert response.status_code == 422 and "is not an MR series" in response.text and pacs["ct"] in response.text
    response = infer(url, "1.2.3.4.5")
    assert response.status_code == 422 and "no series '1.2.3.4.5'" in response.text
    response = requests.post(f"{url}/infer/anofpdm", params={"image": brain.series_uids["flair"],
                                                             "output": "dicom_seg"}, timeout=60)
    assert response.status_code == 422 and "Submit Label" in response.text


def test_pacs_down_is_a_clear_error_and_the_server_keeps_serving(pacs, tmp_path):
    url, orthanc, flair = pacs["server"].url, pacs["orthanc"], pacs["brain"].series_uids["flair"]
    label = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(np.ones(SHAPE, np.uint8), AFFINE), label)
    orthanc.stop()
    try:
        response = infer(url, flair)
        assert response.status_code == 502
        assert f"DICOMweb server {orthanc.dicomweb} failed" in response.text
        with pytest.raises(MONAILabelClientException, match=f"Status: 502.*DICOMweb server {orthanc.dicomweb}"):
            MONAILabelClient(url, tmpdir=str(tmp_path)).save_label(flair, str(label), tag="final")
        assert requests.get(f"{url}/info/", timeout=10).status_code == 200
    finally:
        orthanc.start()
    assert infer(url, flair).status_code == 200
