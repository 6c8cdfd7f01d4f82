"""``fedmed export``: a finished model as a file a hospital's own inference stack loads
without fedmed, with its preprocessing written down beside it.

The exported network takes float32 images (N, 1, S, S) preprocessed as the model card's
``input`` section says and returns the probability of every class (N, classes).

Formats:

- ``pt2`` (default): ``torch.export``'s program, loaded with ``torch.export.load(path).module()``.
- ``onnx``: through torch's dynamo-based ONNX exporter (needs the ``onnx`` extra).
- ``torchscript`` (legacy): ``torch.jit.trace``; torch deprecates TorchScript, so it is offered
  only while the installed torch still has it.

This module imports torch only when a model is exported, so that ``fedmed``'s parser (which
reads :data:`EXPORT_FORMATS`) does not load it.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import nn

    from fedmed.inference import LoadedModel

EXPORT_FORMATS = ("pt2", "onnx", "torchscript")
DEFAULT_FORMAT = "pt2"
LEGACY_FORMATS = ("torchscript",)
TOLERANCE = 1e-5  # largest difference in any probability between the export and fedmed
FILE_NAMES = {"pt2": "model.pt2", "onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
# The one input's name in every format (the ONNX graph's input, the pt2 program's argument).
INPUT_NAME = "images"


def export_model(model_dir: Path | str, export_format: str, out_dir: Path | None = None) -> list[Path]:
    """Write the model in ``export_format`` and its ``preprocessing.json`` to ``out_dir``
    (default: ``MODEL/export``), after checking the file gives fedmed's probabilities."""
    import torch

    from fedmed.inference import load_model_dir

    if export_format not in EXPORT_FORMATS:
        raise ValueError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, got {export_format!r}")
    loaded = load_model_dir(model_dir)
    _check_available(export_format)
    out_dir = Path(out_dir) if out_dir is not None else loaded.path / "export"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / FILE_NAMES[export_format]
    wrapped = _probabilities(loaded.model).eval()
    example = torch.rand(2, 1, loaded.image_size, loaded.image_size, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():  # the tracers' notes on kymatio's shape arithmetic, not for users
        warnings.simplefilter("ignore")
        if export_format == "pt2":
            _export_pt2(wrapped, example, path)
        elif export_format == "onnx":
            _export_onnx(wrapped, example, path)
        else:
            with torch.no_grad():
                torch.jit.trace(wrapped, example).save(str(path))
        # The user chose the legacy format knowingly: torch.jit.load's deprecation is not news here.
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
    """Run an exported file on ``images`` (N, 1, S, S) as a hospital's stack would: with
    torch or ONNX Runtime alone, never through fedmed's model code."""
    batch = images.astype(np.float32)
    if path.suffix == ".onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {INPUT_NAME: batch})[0]
    import torch

    with torch.no_grad():
        if path.suffix == ".pt2":
            return torch.export.load(str(path)).module()(torch.from_numpy(batch)).numpy()
        return torch.jit.load(str(path))(torch.from_numpy(batch)).numpy()


def torchscript_available() -> bool:
    """Whether the installed torch still has TorchScript's tracer and loader: torch deprecates
    them (``torch.jit.load`` warns "Please switch to torch.export"), so a later torch may not."""
    import torch

    jit = getattr(torch, "jit", None)
    return callable(getattr(jit, "trace", None)) and callable(getattr(jit, "load", None))


def _check_available(export_format: str) -> None:
    """Refuse, before anything is written, a format this installation cannot produce."""
    if export_format == "torchscript" and not torchscript_available():
        import torch

        raise ValueError(f"TorchScript is no longer in the installed torch {torch.__version__}; use --format pt2")
    if export_format == "onnx":
        try:
            import onnx  # noqa: F401  (the exporter writes through it)
            import onnxscript  # noqa: F401  (the dynamo-based exporter's operator library)
        except ImportError as exc:
            raise ValueError("ONNX export needs the onnx extra: pip install 'fedmed[onnx]'") from exc


def _probabilities(network: nn.Module) -> nn.Module:
    """The network followed by a softmax: what fedmed's own prediction computes."""
    import torch
    from torch import nn

    class Probabilities(nn.Module):
        def __init__(self, network: nn.Module) -> None:
            super().__init__()
            self.network = network

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.network(images), dim=1)

    return Probabilities(network)


def _batch_dimension() -> dict[str, dict[int, object]]:
    """Any number of images per call, as fedmed's own prediction takes."""
    import torch

    return {INPUT_NAME: {0: torch.export.Dim("batch", min=1)}}


def _export_pt2(wrapped: nn.Module, example: torch.Tensor, path: Path) -> None:
    import torch

    program = torch.export.export(wrapped, (example,), dynamic_shapes=_batch_dimension())
    torch.export.save(program, str(path))


def _export_onnx(wrapped: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Through torch.export (``dynamo=True``): the TorchScript-based ONNX exporter goes with
    TorchScript. Its FFTs become ONNX DFT nodes, so the scattering front-end exports too."""
    import torch

    torch.onnx.export(
        wrapped,
        (example,),
        str(path),
        input_names=[INPUT_NAME],
        output_names=["probabilities"],
        dynamic_shapes=_batch_dimension(),
        dynamo=True,
        external_data=False,  # one file, as the other formats
        # onnxscript's graph optimiser took minutes on the scattering model's filter bank (230 s
        # against 30 s without, on 2 busy cores); ONNX Runtime optimises the graph when it loads.
        optimize=False,
        verbose=False,
    )


def _preprocessing(loaded: LoadedModel, file_name: str) -> dict:
    """What a hospital's stack must do before calling the exported file, from the model card."""
    card = loaded.card
    return {
        "file": file_name,
        "input": {
            "name": INPUT_NAME,
            "shape": ["N", 1, loaded.image_size, loaded.image_size],
            "dtype": "float32",
            **card["input"],
        },
        "output": {"name": "probabilities", "shape": ["N", len(loaded.classes)], "classes": list(loaded.classes)},
        "decision": card.get("decision"),
        "model_card": str(loaded.path / "model_card.md"),
        "run_id": card.get("run_id"),
    }
