"""The CPU network served as a traced graph cached by its weights: same outputs, never stale, no MONAI import."""

import subprocess
import sys

import numpy as np
import nibabel as nib
import pytest
import torch

from anofpdm.method.diffusion import ScheduleConfig
from anofpdm.method.model import (
    HEALTHY,
    NULL_LABEL,
    UNHEALTHY,
    build_network,
    load_checkpoint,
    load_model,
    save_checkpoint,
    traced_network_path,
)

from conftest import REPO, TINY, make_volume_pair, tiny_calibration


def _eager(path):
    payload = load_checkpoint(path)
    network = build_network(TINY)
    network.load_state_dict(payload["state_dict"])
    return network.eval(), payload["state_dict"]


def test_the_cpu_network_is_the_cached_trace_of_the_weights_with_the_eager_outputs(tiny_model_path):
    eager, state_dict = _eager(tiny_model_path)
    cached = traced_network_path(TINY, state_dict)
    cached.unlink(missing_ok=True)
    model = load_model(tiny_model_path)
    assert isinstance(model.network, torch.jit.ScriptModule) and cached.is_file()
    written = cached.stat().st_mtime_ns
    again = load_model(tiny_model_path)
    assert cached.stat().st_mtime_ns == written  # read, not traced again
    generator = torch.Generator().manual_seed(0)
    for batch in (1, 5, 16):  # any batch size, any labels, any timesteps: the trace has no batch-bound constant
        x = torch.randn(batch, 2, 16, 16, generator=generator)
        t = torch.randint(0, 1000, (batch,), generator=generator)
        labels = torch.tensor([HEALTHY, UNHEALTHY, NULL_LABEL] * 6)[:batch]
        with torch.no_grad():
            expected = eager(x, t, class_labels=labels)
            assert torch.equal(model.network(x, t, class_labels=labels), expected)
            assert torch.equal(again.network(x, t, class_labels=labels), expected)
    assert model.device == torch.device("cpu")


def test_other_weights_get_their_own_graph_and_a_broken_cache_is_traced_again(tiny_model_path, tmp_path):
    _, state_dict = _eager(tiny_model_path)
    changed = {name: value + 0.01 if value.is_floating_point() else value for name, value in state_dict.items()}
    other = save_checkpoint(tmp_path / "other.pt", TINY, changed, ScheduleConfig().to_dict(),
                            calibration={"fast": tiny_calibration()})
    assert traced_network_path(TINY, changed) != traced_network_path(TINY, state_dict)
    x, t, labels = torch.ones(1, 2, 16, 16), torch.tensor([5]), torch.tensor([HEALTHY])
    with torch.no_grad():
        assert not torch.equal(load_model(other).network(x, t, class_labels=labels),
                               load_model(tiny_model_path).network(x, t, class_labels=labels))
    cached = traced_network_path(TINY, changed)
    cached.write_bytes(b"cut short")
    with pytest.warns(UserWarning, match="traced again"):
        model = load_model(other)
    assert isinstance(model.network, torch.jit.ScriptModule) and cached.stat().st_size > 1000


def test_segmenting_with_a_cached_graph_imports_no_monai_nor_training_or_evaluation_code(tiny_model_path, tmp_path):
    load_model(tiny_model_path)  # the graph is in the session's cache (ANOFPDM_CACHE_DIR, inherited below)
    for name, image in make_volume_pair().items():
        nib.save(image, tmp_path / f"{name}.nii.gz")
    script = (
        "import sys\n"
        "from anofpdm.cli import main\n"
        f"code = main(['segment', '--model', {str(tiny_model_path)!r}, '--flair', {str(tmp_path / 'flair.nii.gz')!r},"
        f" '--t2', {str(tmp_path / 't2.nii.gz')!r}, '--out', {str(tmp_path / 'mask.nii.gz')!r}])\n"
        "print(code, sorted(m for m in sys.modules if m.split('.')[0] == 'monai'\n"
        "                   or m.startswith(('anofpdm.training', 'anofpdm.evaluation', 'sklearn'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "0 []"
    assert np.asanyarray(nib.load(tmp_path / "mask.nii.gz").dataobj).shape == (40, 44, 12)
