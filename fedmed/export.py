"""``fedmed export``: a finished model as a file a hospital's own inference stack loads
without fedmed, with its preprocessing written down beside it.

The exported network takes float32 images (N, 1, S, S) preprocessed as the model card's
``input`` section says and returns the probability of every class (N, classes).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedmed.inference import LoadedModel, load_model_dir
from fedmed.model import ScatteringStem

EXPORT_FORMATS = ("torchscript", "onnx")
TOLERANCE = 1e-5  # largest difference in any probability between the export and fedmed
FILE_NAMES = {"torchscript": "model.torchscript.pt", "onnx": "model.onnx"}


class Probabilities(nn.Module):
    """The network followed by a softmax: what fedmed's own prediction computes."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.network(images), dim=1)


def export_model(model_dir: Path | str, export_format: str, out_dir: Path | None = None) -> list[Path]:
    """Write the model in ``export_format`` and its ``preprocessing.json`` to ``out_dir``
    (default: ``MODEL/export``), after checking the file gives fedmed's probabilities."""
    if export_format not in EXPORT_FORMATS:
        raise ValueError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, got {export_format!r}")
    loaded = load_model_dir(model_dir)
    out_dir = Path(out_dir) if out_dir is not None else loaded.path / "export"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / FILE_NAMES[export_format]
    _traceable(loaded.model)
    wrapped = Probabilities(loaded.model).eval()
    example = torch.rand(2, 1, loaded.image_size, loaded.image_size, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():  # the tracers' notes on kymatio's shape arithmetic, not for users
        warnings.simplefilter("ignore")
        if export_format == "torchscript":
            with torch.no_grad():
                torch.jit.trace(wrapped, example).save(str(path))
        else:
            _export_onnx(wrapped, example, path, loaded)
    check = exported_probabilities(path, example.numpy())
    with torch.no_grad():
        expected = wrapped(example).numpy()
    if not np.allclose(check, expected, rtol=0, atol=TOLERANCE):
        path.unlink()
        raise RuntimeError(
            f"the {export_format} export differs from fedmed's probabilities by "
            f"{np.abs(check - expected).max():.2g} (> {TOLERANCE}); nothing exported"
        )
    card_path = out_dir / "preprocessing.json"
    card_path.write_text(json.dumps(_preprocessing(loaded, path.name), indent=2) + "\n")
    return [path, card_path]


def exported_probabilities(path: Path, images: np.ndarray) -> np.ndarray:
    """Run an exported file on ``images`` (N, 1, S, S) as a hospital's stack would."""
    if path.suffix == ".onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {"images": images.astype(np.float32)})[0]
    with torch.no_grad():
        return torch.jit.load(str(path))(torch.from_numpy(images.astype(np.float32))).numpy()


def _traceable(model: nn.Module) -> None:
    """Give a scattering stem a modulus that tracing can record (kymatio's is a custom
    autograd function, which only matters for training; the values are the same)."""
    stem = getattr(model, "frontend", None)
    if isinstance(stem, ScatteringStem):
        backend = stem.scattering.backend
        stem.scattering.backend = type(
            "TraceableBackend",
            (backend if isinstance(backend, type) else type(backend),),
            {"modulus": staticmethod(_modulus)},
        )


def _modulus(x: torch.Tensor) -> torch.Tensor:
    return (x[..., 0] * x[..., 0] + x[..., 1] * x[..., 1]).sqrt()[..., None]


def _export_onnx(wrapped: nn.Module, example: torch.Tensor, path: Path, loaded: LoadedModel) -> None:
    try:
        import onnx  # noqa: F401  (the exporter needs it)
    except ImportError as exc:
        raise ValueError("ONNX export needs the onnx extra: pip install 'fedmed[onnx]'") from exc
    if isinstance(getattr(loaded.model, "frontend", None), ScatteringStem):
        raise ValueError(
            "this model has the scattering front-end, whose FFTs ONNX cannot express; "
            "export it with --format torchscript"
        )
    torch.onnx.export(
        wrapped,
        (example,),
        str(path),
        input_names=["images"],
        output_names=["probabilities"],
        dynamic_axes={"images": {0: "batch"}, "probabilities": {0: "batch"}},
        dynamo=False,
    )


def _preprocessing(loaded: LoadedModel, file_name: str) -> dict:
    """What a hospital's stack must do before calling the exported file, from the model card."""
    card = loaded.card
    return {
        "file": file_name,
        "input": {
            "name": "images",
            "shape": ["N", 1, loaded.image_size, loaded.image_size],
            "dtype": "float32",
            **card["input"],
        },
        "output": {"name": "probabilities", "shape": ["N", len(loaded.classes)], "classes": list(loaded.classes)},
        "decision": card.get("decision"),
        "model_card": str(loaded.path / "model_card.md"),
        "run_id": card.get("run_id"),
    }
