"""End to end on a PACS: Orthanc from the Debian packages, MONAI Label on its DICOMweb URL, offline.

Orthanc (``orthanc`` + ``orthanc-dicomweb``, which ``.ci/run`` installs) runs from a generated configuration
in a temporary folder, on free ports, without authentication and accepting local clients only. The studies
are small synthetic FLAIR/T2 pairs written as DICOM MR series by ``anofpdm.dicom`` and stored over STOW-RS.
MONAI Label starts with ``--studies <orthanc>/dicom-web`` and a dead HTTP(S) proxy for everything but
127.0.0.1, so any download at startup would fail it. The model is the tiny random-weight network whose
calibration flags every slice (``unhealthy_model``), so masks are not empty.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
from anofpdm.dicom import SERIES_DESCRIPTIONS, write_series, write_study
from anofpdm.metrics import dice
from conftest import APP_DIR, STARTUP_DEADLINE_S, Server, free_port, make_volume_pair
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
SHOW_LESIONS = {"median_kernel": 1, "min_lesion_mm3": 0}
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
        deadline = time.monotonic() + STARTUP_DEADLINE_S
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.url}/system", timeout=1.0).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            try:
                code = self.process.wait(timeout=0.1)
            except subprocess.TimeoutExpired:
                continue
            raise RuntimeError(f"Orthanc exited with {code}:\n{self.log_path.read_text()[-3000:]}")
        raise TimeoutError(f"Orthanc not ready after {STARTUP_DEADLINE_S} s:\n{self.log_path.read_text()[-3000:]}")

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
               "alone": alone, "twice": twice, "repeat": repeat, "cache": cache, "root": root}


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
    mr_series = {*brain.series_uids.values(), *pacs["alone"].series_uids.values(),
                 *pacs["twice"].series_uids.values(), pacs["repeat"]}
    assert picked and picked <= mr_series  # the CT series is not offered


def test_infer_on_the_flair_series_uses_the_t2_of_its_study(pacs, tmp_path):
    server, brain, pair = pacs["server"], pacs["brain"], pacs["pair"]
    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
    label_file, result = client.infer("anofpdm", brain.series_uids["flair"], dict(SHOW_LESIONS))
    assert result["series"] == {"flair": brain.series_uids["flair"], "t2": brain.series_uids["t2"]}
    assert SERIES_DESCRIPTIONS["t2"] in result["inputs"]["t2"]
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
