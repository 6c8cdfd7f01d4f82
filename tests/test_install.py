"""The installed environment has working versions of everything fedmed builds on."""

import pydicom.pixels
import pytest
import torch
from packaging.version import Version
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, JPEGLossless, JPEGLSLossless, RLELossless


def test_torchvision_imports_and_runs_its_operators():
    import torchvision
    from torchvision.ops import nms

    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    keep = nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5)
    assert keep.tolist() == [0, 2]
    assert Version(torchvision.__version__) >= Version("0.29")


def test_federation_and_privacy_packages_import():
    import flwr
    import opacus

    assert Version("1.41") <= Version(flwr.__version__) < Version("1.42")
    assert Version(opacus.__version__) >= Version("1.5"), "pyproject.toml asks for opacus>=1.5"


def test_the_installed_flower_is_a_tested_release_and_others_are_refused_by_name(monkeypatch):
    from fedmed.flower import waits

    assert waits.check_flower().startswith("1.41.")
    monkeypatch.setattr(waits, "version", lambda package: "1.43.2")
    with pytest.raises(RuntimeError, match=r"tested with Flower 1\.41\.x.*flwr 1\.43\.2"):
        waits.check_flower()


def test_compressed_transfer_syntaxes_have_a_decoder():
    for syntax in (JPEGBaseline8Bit, JPEGLossless, JPEGLSLossless, JPEG2000Lossless, RLELossless):
        assert pydicom.pixels.get_decoder(syntax).is_available, syntax.name
