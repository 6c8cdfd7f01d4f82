"""Using a finished model: ``fedmed predict`` on new DICOM studies, ``fedmed export``, the
model card, and the per-round results (CSV, TensorBoard). The model is the one the shared
3-site simulation trained (tests/conftest.py)."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom.data import get_testdata_file

import fedmed.export
from fedmed.config import RunSettings
from fedmed.coordinator.model_card import model_card, model_card_markdown, weights_sha256
from fedmed.data.cache import decode_files
from fedmed.data.dicom import ReadOptions
from fedmed.export import DEFAULT_FORMAT, FILE_NAMES, TOLERANCE, export_model, exported_probabilities
from fedmed.inference import load_model_dir
from fedmed.metrics import calibration, classification_metrics
from fedmed.model import ModelConfig, build_model
from fedmed.rundir import RunDirectory, load_arrays
from fedmed.train import predict
from fedmed.weights import model_state
from tests.federation_helpers import BIN, process_env

# Real DICOM files shipped with pydicom: CT, MR, a JPEG 2000 and an RLE-compressed image.
PYDICOM_FILES = ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm")
MITCHELL_HEADINGS = ("Model details", "Intended use", "Factors", "Metrics", "Training data", "Evaluation data",
                     "Quantitative analyses", "Ethical considerations", "Caveats and recommendations")


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _fedmed(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "fedmed"), *args], capture_output=True, text=True, env=process_env(tmp),
                          timeout=300)


@pytest.fixture(scope="module")
def model_dir(simulation) -> Path:
    return simulation[0] / "federated" / "model"


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> Path:
    """A hospital's folder of any layout: real DICOM files, a corrupt one and a note."""
    folder = tmp_path_factory.mktemp("studies") / "incoming"
    (folder / "2026" / "ward-b").mkdir(parents=True)
    for index, name in enumerate(PYDICOM_FILES):
        shutil.copy(get_testdata_file(name), folder / ("2026" if index % 2 else "2026/ward-b") / name)
    good = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    (folder / "2026" / "truncated.dcm").write_bytes(good[: len(good) // 3])
    (folder / "README.txt").write_text("scanned on Tuesday\n")
    return folder


@pytest.mark.slow
def test_predict_scores_every_good_file_and_names_every_bad_one(model_dir, studies, tmp_path):
    before = _digest(studies)
    result = _fedmed("predict", str(model_dir), str(studies), "--out", str(tmp_path / "out" / "pred.csv"),
                     "--format", "csv,json", tmp=tmp_path)
    assert result.returncode == 0, result.stderr
    assert _digest(studies) == before, "source files are only read"

    rows = list(csv.DictReader(open(tmp_path / "out" / "pred.csv")))
    assert sorted(Path(r["path"]).name for r in rows) == sorted(PYDICOM_FILES)
    skipped = {r["path"]: r for r in csv.DictReader(open(tmp_path / "out" / "pred-skipped.csv"))}
    assert sorted(skipped) == ["2026/truncated.dcm", "README.txt"]
    assert skipped["README.txt"]["reason"] == "not-dicom" and skipped["2026/truncated.dcm"]["reason"]
    assert "skipped 2026/truncated.dcm" in result.stdout and "4 files scored, 2 skipped" in result.stdout
    assert not (tmp_path / "out" / "pred-metrics.json").exists(), "no labels, no metrics"

    # The same probabilities as fedmed's own prediction on the same preprocessed images.
    loaded = load_model_dir(model_dir)
    paths = [studies / r["path"] for r in rows]
    decoded = decode_files(paths, ReadOptions(image_size=loaded.image_size))
    expected = predict(loaded.model, np.asarray(decoded.images))
    got = np.array([[float(r[f"p_{c}"]) for c in loaded.classes] for r in rows])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert [r["decision"] for r in rows] == [loaded.classes[i] for i in expected.argmax(axis=1)]
    assert all(r["sop_instance_uid"] == d.sop_instance_uid and d.sop_instance_uid for r, d in zip(rows, decoded.files))
    document = json.loads((tmp_path / "out" / "pred.json").read_text())
    assert [p["path"] for p in document["predictions"]] == [r["path"] for r in rows]
    assert len(document["skipped"]) == 2 and document["metrics"] is None


@pytest.mark.slow
def test_with_class_folders_predict_reports_the_metrics(model_dir, simulation, tmp_path):
    test_set = simulation[0].parent / "data" / "test"  # the simulation's held-out DICOM folders
    result = _fedmed("predict", str(model_dir), str(test_set), "--out", str(tmp_path / "test.csv"), "--quiet",
                     tmp=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(open(tmp_path / "test.csv")))
    loaded = load_model_dir(model_dir)
    labels = np.array([loaded.classes.index(r["label"]) for r in rows])
    probabilities = np.array([[float(r[f"p_{c}"]) for c in loaded.classes] for r in rows])
    metrics = json.loads((tmp_path / "test-metrics.json").read_text())
    expected = classification_metrics(labels, probabilities)
    for key in ("auroc", "balanced_accuracy", "sensitivity", "specificity", "accuracy"):
        assert metrics[key] == pytest.approx(expected[key], abs=1e-9), key
    assert metrics["confusion_matrix"] == expected["confusion_matrix"]
    assert metrics["calibration"]["expected_calibration_error"] == pytest.approx(  # float32 -> CSV text
        calibration(labels, probabilities)["expected_calibration_error"], abs=1e-6)
    assert len(set(labels)) == 2 and f"AUROC {metrics['auroc']:.3g}" in result.stdout
    assert (tmp_path / "test-reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_expected_calibration_error_by_hand():
    # Confidences 0.9, 0.9 (one right), 0.6 (right), 0.55 (wrong): bins (0.8, 0.9] and (0.5, 0.6].
    probabilities = np.array([[0.1, 0.9], [0.9, 0.1], [0.4, 0.6], [0.55, 0.45]])
    labels = np.array([1, 1, 1, 1])
    table = calibration(labels, probabilities)
    # bin (0.8, 0.9]: confidence 0.9, accuracy 0.5 -> 2/4 * 0.4; bin (0.5, 0.6]: mean confidence
    # 0.575, accuracy 0.5 -> 2/4 * 0.075.
    assert table["expected_calibration_error"] == pytest.approx(0.5 * 0.4 + 0.5 * 0.075)
    assert [b["count"] for b in table["bins"]] == [0, 0, 0, 0, 0, 2, 0, 0, 2, 0]


def test_predict_refuses_what_is_not_a_model(tmp_path):
    result = _fedmed("predict", str(tmp_path), str(tmp_path), tmp=tmp_path)
    assert result.returncode == 2 and "is not a fedmed model: model.npz and model_card.json not found" in result.stderr


def _scattering_model_dir(tmp: Path, frontend: str = "scattering") -> Path:
    run = RunSettings(run_id="export-test", depth=10, width=8, image_size=28, frontend=frontend)
    state = model_state(build_model(ModelConfig.from_settings(run), seed=5))
    card = model_card(run, {}, 1, None, weights=state)
    run_dir = RunDirectory(tmp / "run")
    run_dir.write_final_model(state, card, model_card_markdown(card))
    return run_dir.model_dir


def _pydicom_images(image_size: int) -> np.ndarray:
    decoded = decode_files([Path(get_testdata_file(n)) for n in PYDICOM_FILES], ReadOptions(image_size=image_size))
    assert all(f.row is not None for f in decoded.files)
    return np.asarray(decoded.images)


@contextlib.contextmanager
def _loads_without_warnings(export_format: str) -> Iterator[None]:
    """TorchScript is legacy: its loader's deprecation warning is expected, and checked, there
    alone; the other formats must load without any warning."""
    if export_format == "torchscript":
        with pytest.warns(FutureWarning, match="torch.jit.load` is deprecated"):
            yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# The scattering model's pt2 export (the slowest to trace, about 45 s) is checked once, by
# the default-format test below, which runs it on one image and on a batch.
@pytest.mark.parametrize("which,export_format", [("simulation", "pt2"),
                                                 ("simulation", "onnx"), ("scattering", "onnx"),
                                                 ("simulation", "torchscript"), ("scattering", "torchscript")])
@pytest.mark.slow
def test_an_exported_model_gives_fedmeds_probabilities(which, export_format, model_dir, tmp_path):
    if export_format == "onnx":
        pytest.importorskip("onnxruntime")
    folder = model_dir if which == "simulation" else _scattering_model_dir(tmp_path)
    result = _fedmed("export", str(folder), "--format", export_format, "--out", str(tmp_path / "export"),
                     tmp=tmp_path)
    assert result.returncode == 0, result.stderr
    loaded = load_model_dir(folder)
    images = _pydicom_images(loaded.image_size)
    exported = tmp_path / "export" / FILE_NAMES[export_format]
    assert result.stdout.splitlines()[0] == f"wrote {exported}"
    with _loads_without_warnings(export_format):
        got = exported_probabilities(exported, images[:, None])
    np.testing.assert_allclose(got, predict(loaded.model, images), rtol=0, atol=TOLERANCE)
    assert got.shape == (len(PYDICOM_FILES), len(loaded.classes)) and np.ptp(got[:, 0]) > 0
    preprocessing = json.loads((tmp_path / "export" / "preprocessing.json").read_text())
    assert preprocessing["file"] == exported.name and preprocessing["input"]["name"] == "images"
    assert preprocessing["input"]["image_size"] == loaded.image_size
    assert preprocessing["output"]["classes"] == list(loaded.classes)


def test_the_default_export_is_a_torch_export_program_that_takes_any_batch(tmp_path):
    folder = _scattering_model_dir(tmp_path)
    written = export_model(folder, DEFAULT_FORMAT)
    assert DEFAULT_FORMAT == "pt2" and [p.name for p in written] == ["model.pt2", "preprocessing.json"]
    assert written[0].parent == folder / "export", "MODEL/export unless --out says otherwise"
    program = torch.export.load(str(written[0])).module()  # torch alone: no fedmed class inside
    loaded = load_model_dir(folder)
    images = _pydicom_images(loaded.image_size)
    for batch in (images[:1], images):
        with torch.no_grad():
            got = program(torch.from_numpy(batch[:, None].astype(np.float32))).numpy()
        np.testing.assert_allclose(got, predict(loaded.model, batch), rtol=0, atol=TOLERANCE)


def test_an_export_that_disagrees_is_refused_with_the_difference_and_nothing_kept(tmp_path, monkeypatch):
    folder = _scattering_model_dir(tmp_path, frontend="pixels")
    shifted = fedmed.export.exported_probabilities
    monkeypatch.setattr(fedmed.export, "exported_probabilities", lambda path, images: shifted(path, images) + 2e-5)
    with pytest.raises(RuntimeError, match=r"the pt2 export differs from fedmed's probabilities by 2e-05"):
        export_model(folder, "pt2", tmp_path / "export")
    assert list((tmp_path / "export").iterdir()) == []


def test_a_format_torch_no_longer_has_is_refused_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(fedmed.export, "torchscript_available", lambda: False)
    with pytest.raises(ValueError, match=r"TorchScript is no longer in the installed torch .*; use --format pt2"):
        export_model(_scattering_model_dir(tmp_path), "torchscript", tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_onnx_without_its_extra_is_refused_with_the_install_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed: importing it fails
    with pytest.raises(ValueError, match=r"ONNX export needs the onnx extra: pip install 'fedmed\[onnx\]'"):
        export_model(_scattering_model_dir(tmp_path), "onnx", tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_the_export_command_names_the_formats_without_loading_torch(tmp_path):
    code = ("import sys; from fedmed.cli.main import build_parser; build_parser('export'); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([str(BIN / "python"), "-c", code], capture_output=True, text=True, env=process_env(tmp_path))
    assert result.returncode == 0, result.stderr
    helped = _fedmed("export", "--help", tmp=tmp_path)
    assert "{pt2,onnx,torchscript}" in helped.stdout and "default pt2; torchscript is legacy" in helped.stdout


def test_the_model_card_holds_every_field_a_reader_needs(simulation):
    run_dir = RunDirectory(simulation[0] / "federated")
    card = json.loads((run_dir.model_dir / "model_card.json").read_text())
    details = card["model_details"]
    assert details["weights_sha256"] == weights_sha256(load_arrays(run_dir.model_dir / "model.npz"))
    assert all(details["software"][p] for p in ("fedmed", "torch", "flwr", "opacus"))
    assert details["initial_model"]["source"] == "random initialisation"
    assert card["intended_use"]["primary_uses"] and len(card["intended_use"]["out_of_scope"]) >= 3
    assert card["architecture"]["width"] == 8 and card["input"]["image_size"] == 16
    assert "DICOM pixel data" in card["input"]["preprocessing"]
    assert card["settings"]["rounds"] == 2 and card["training"]["aggregation"].startswith("FedAvg")
    for name, site in card["sites"].items():
        assert site["examples"] > 0 and site["rounds_joined"] == 2 and site["epsilon"] > 0 and site["dp"], name
        assert card["privacy"]["sites"][name]["epsilon"] == site["epsilon"]
    assert "one patient" in card["privacy"]["unit"], "the synthetic sites have PatientIDs: patient level"
    assert all(site["privacy_unit"] == "patient" for site in card["privacy"]["sites"].values())
    last_round = [r for r in run_dir.metrics() if r["event"] == "round"][-1]
    assert card["quantitative_analyses"]["held_out"] == last_round["server_validation"]
    # NaN when the noise leaves a class of these tiny sites without records
    assert card["quantitative_analyses"]["sites_validation"]["val-auroc"] == \
        pytest.approx(card["validation"]["val-auroc"], nan_ok=True)
    assert card["decision"]["rule"] and card["decision"]["site_data_used"] is False
    assert any("px" in item for item in card["caveats_and_recommendations"])
    text = (run_dir.model_dir / "model_card.md").read_text()
    assert [h for h in MITCHELL_HEADINGS if f"## {h}" not in text] == []


def test_per_round_results_open_as_csv_and_in_tensorboard(simulation):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = RunDirectory(simulation[0] / "federated")
    rows = list(csv.DictReader(open(run_dir.path / "metrics.csv")))
    rounds = [r for r in run_dir.metrics() if r["event"] == "round"]
    assert [int(r["round"]) for r in rows] == [1, 2]
    assert [int(r["trained"]) for r in rows] == [3, 3]
    assert float(rows[1]["held_out_auroc"]) == pytest.approx(rounds[1]["server_validation"]["auroc"])
    assert rows[0]["held_out_auroc"] == "", "evaluate_every = 2: round 1's model was not scored"
    final = [r for r in run_dir.metrics() if r["event"] == "validation"][-1]
    # from the sites' noisy counts: NaN when the noise leaves a class of these tiny sites empty
    assert float(rows[1]["sites_val_auroc"]) == pytest.approx(final["weighted"]["val-auroc"], nan_ok=True)

    events = EventAccumulator(str(run_dir.path / "tensorboard"))
    events.Reload()
    held_out = events.Scalars("held_out/auroc")
    assert [(e.step, round(e.value, 5)) for e in held_out] == [(2, round(rounds[1]["server_validation"]["auroc"], 5))]
    assert [e.step for e in events.Scalars("train/examples")] == [1, 2]
    assert "train/loss" not in events.Tags()["scalars"], "the sites do not release their training loss by default"
