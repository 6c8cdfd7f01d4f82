"""Shared fixtures: real DICOM files, a small exported site, and the shared data set."""

from __future__ import annotations

import os

# Under pytest-xdist (`make test`: two workers on two cores, each starting processes that
# train), one thread per process for torch's (OpenMP) pool, in the tests and in every
# process they start (fedmed-client, fedmed-simulate, their sites), unless the caller chose
# otherwise: with torch's default of a thread per core their pools spin against each other
# (in a suite run beside other work, a DP test on real X-rays took 156 s of CPU; alone it
# takes 13 s of wall time). A run in one process (`pytest tests/test_x.py`) keeps torch's default.
# Set before torch is imported.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import hashlib  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from filelock import FileLock  # noqa: E402

from fedmed.data.export import SITE_STYLES, export_site  # noqa: E402
from fedmed.data.synthetic import synthesize, synthetic_labels  # noqa: E402
from tests.federation_helpers import BIN, run_simulate  # noqa: E402

if os.environ.get("OMP_NUM_THREADS"):
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
SHARED_DATA = Path(os.environ.get("FEDMED_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
PNEUMONIA_NPZ = SHARED_DATA / "pneumoniamnist.npz"


def pydicom_file(name: str) -> Path:
    """A real DICOM test file shipped inside the pydicom wheel."""
    path = PYDICOM_FILES / name
    assert path.is_file(), f"pydicom test file {name} missing from {PYDICOM_FILES}"
    return path


def tree_state(root: Path) -> dict[str, tuple[str, int, int]]:
    """Content hash, size and mtime of every file under ``root``."""
    state = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        state[str(path.relative_to(root))] = (digest, stat.st_size, stat.st_mtime_ns)
    return state


def write_synthetic_site(out: Path, n_images: int = 24, style_index: int = 0, seed: int = 0, size: int = 32) -> Path:
    labels, patients = synthetic_labels(n_images, 0.5, seed)
    images = synthesize(labels, patients, size=size, seed=seed)
    export_site(images, out, out.name, SITE_STYLES[style_index], seed)
    return out


@pytest.fixture
def synthetic_site(tmp_path: Path) -> Path:
    return write_synthetic_site(tmp_path / "site")


@pytest.fixture
def mixed_site(tmp_path: Path) -> Path:
    """Good synthetic files plus one of every kind of bad file a hospital folder holds."""
    root = write_synthetic_site(tmp_path / "mixed", n_images=20)
    (root / "normal" / "notes.txt").write_text("scanner maintenance notes\n")
    shutil.copy(pydicom_file("MR_truncated.dcm"), root / "pneumonia" / "truncated.dcm")
    shutil.copy(pydicom_file("rtplan.dcm"), root / "normal" / "rtplan.dcm")
    shutil.copy(pydicom_file("examples_ybr_color.dcm"), root / "normal" / "cine.dcm")
    good = sorted((root / "normal").glob("SYN*.dcm"))[0]
    corrupt = bytearray(good.read_bytes())
    corrupt[140:400] = bytes(range(130)) * 2  # header elements overwritten with junk
    (root / "normal" / "corrupt.dcm").write_bytes(bytes(corrupt))
    shutil.copy(good, root / "normal" / "zz-copy.dcm")
    (root / "edema").mkdir()
    shutil.copy(good, root / "edema" / "case.dcm")
    (root / "README.txt").write_text("site export\n")
    return root


@pytest.fixture(scope="session")
def pneumonia_npz() -> Path:
    if not PNEUMONIA_NPZ.is_file():
        pytest.skip(f"real chest X-ray data not found at {PNEUMONIA_NPZ} (set FEDMED_SHARED_DATA)")
    return PNEUMONIA_NPZ


@pytest.fixture(scope="session")
def public_nih_npz() -> Path:
    path = SHARED_DATA / "nih-cxr-public-28.npz"
    if not path.is_file():
        pytest.skip(f"public NIH chest X-ray data not found at {path} (set FEDMED_SHARED_DATA)")
    return path


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve by the rank statistic (ties count half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


TINY_SCENARIO = ["data.images=240", "data.image_size=16", "partition.sites=3", "partition.min_site_size=15",
                 "training.rounds=2", "training.batch_size=32", "model.width=8"]


@pytest.fixture(scope="session")
def simulation(tmp_path_factory):
    """A 3-site, 2-round fedmed-simulate run in all modes (about a minute), evaluating only
    the initial and the final model; shared by the simulation and report tests. Returns
    (results dir, survivors, processes seen, output).

    Run once per test session: under pytest-xdist (``make test``) the first worker to ask
    runs it while the others wait on a lock, then all read what it recorded."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of this session
    with FileLock(str(root / "simulation.lock")):
        record = root / "simulation.json"
        if not record.exists():
            record.write_text(json.dumps(_run_shared_simulation(root / "simulation")))
        results, survivors, seen, output = json.loads(record.read_text())
    return Path(results), survivors, seen, output


def _run_shared_simulation(tmp: Path) -> list:
    tmp.mkdir(exist_ok=True)
    command = [str(BIN / "fedmed-simulate"), "--mode", "all", "--out", str(tmp / "out"),
               "--set", "privacy.max_epsilon=[8.0, 8.0, 4.0]", "--set", "privacy.target_epsilon=[8.0, 8.0, 4.0]",
               "--set", "privacy.max_epsilon_per_run=[8.0, 8.0, 4.0]",
               "--set", "training.evaluate_every=2"]
    for value in TINY_SCENARIO:
        command += ["--set", value]
    code, survivors, seen = run_simulate(command, tmp)
    assert code == 0, (tmp / "simulate.out").read_text()
    results = sorted((tmp / "out").glob("results-*"))[-1]
    return [str(results), survivors, seen, (tmp / "simulate.out").read_text()]


# Tests that start real Flower processes or a whole fedmed-simulate run (pyproject.toml's
# markers): whole modules by their own `pytestmark`, and here every test that uses a fixture
# which starts them, so a new test on the shared simulation is marked without thinking.
PROCESS_FIXTURES = {"simulation"}


# The longest modules, longest first (CPU seconds in a fresh-clone run, 2026-12-03). `make
# test`'s workers take whole modules in collection order, so these go first: started last,
# the 4-minute model-quality run alone kept one worker busy minutes after the other was done.
LONGEST_FIRST = (
    "test_model_quality.py",
    "test_federation.py",
    "test_predict.py",
    "test_site_runtime.py",
    "test_audit.py",
    "test_federation_failures.py",
    "test_admin_door.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a module's own order is kept
