"""kymatio's 2-D scattering transform (orders 0 to 2), with each scale's wavelets applied at once.

kymatio walks its filter bank one path at a time: at J=2 and 8 angles that is 81 paths of
about ten tensor operations each. On fedmed's small images the time goes to the number of
operations, not their size, and a traced export records every one of them (about 8,000
calls). Here the L wavelets of a scale are stacked and applied to the whole batch together,
so one transform at J=2 is about a hundred larger operations instead of some 800.

The filters, the padding and the arithmetic are kymatio's: the same products with the same
real filters, the same means for the Fourier-domain subsampling, FFTs of the same inputs and
the modulus as the same square root of a sum of squares. Only the grouping into larger
tensors differs (tests/test_model_structure.py compares the two on real images).

Complex values are kept as kymatio keeps them, as real tensors whose last dimension holds the
real and the imaginary part, so exporters see the same kinds of operations as before.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FilterBank:
    """kymatio's filters regrouped: ``lowpass[r]`` is the low-pass filter at resolution r
    (the signal subsampled by 2^r), ``wavelets[j][r]`` the L wavelets of scale j at
    resolution r (0, and every r < j: the first scales of second-order paths), stacked.
    Each is real, (..., M_r, N_r, 1)."""

    scales: int
    lowpass: list[torch.Tensor]
    wavelets: list[list[torch.Tensor]]


def regroup(phi: dict, psi: list[dict], scales: int) -> FilterBank:
    """A kymatio filter bank (``phi``, ``psi`` as its ``load_filters`` gives them, psi
    ordered by scale, then angle) as a :class:`FilterBank`."""
    by_scale = [[p["levels"] for p in psi if p["j"] == j] for j in range(scales)]
    wavelets = [[torch.stack([levels[r] for levels in scale]) for r in range(len(scale[0]))] for scale in by_scale]
    return FilterBank(scales, list(phi["levels"]), wavelets)


def scattering_coefficients(
    images: torch.Tensor,
    pad: Callable[[torch.Tensor], torch.Tensor],
    unpad: Callable[[torch.Tensor], torch.Tensor],
    bank: FilterBank,
) -> torch.Tensor:
    """Scattering coefficients of ``images`` (B, M, N): (B, C, M / 2^J, N / 2^J), in kymatio's
    channel order (order 0, then order 1 by scale and angle, then order 2 by the first
    path's scale and angle and the second's). ``pad`` and ``unpad`` are kymatio's."""
    J = bank.scales
    signal = _fft(_as_complex(pad(images)))  # (B, M', N', 2)
    orders = [_lowpass(signal, bank.lowpass[0], 2**J, unpad)[:, None]]  # (B, 1, m, n)
    first: list[torch.Tensor] = []
    second: list[torch.Tensor] = []
    for j1 in range(J):
        waves = _modulus_spectrum(signal[:, None] * bank.wavelets[j1][0], 2**j1)  # (B, L, M'/2^j1, N'/2^j1, 2)
        first.append(_lowpass(waves, bank.lowpass[j1], 2 ** (J - j1), unpad))  # (B, L, m, n)
        # one first angle at a time: a (B, L, L, ...) product is too large at 224 px
        for angle in range(waves.shape[1]):
            deeper = [
                _lowpass(
                    _modulus_spectrum(waves[:, angle, None] * bank.wavelets[j2][j1], 2 ** (j2 - j1)),
                    bank.lowpass[j2],
                    2 ** (J - j2),
                    unpad,
                )  # (B, L, m, n): the second angles
                for j2 in range(j1 + 1, J)
            ]
            second.extend(deeper)
    return torch.cat(orders + first + second, dim=1)


def _modulus_spectrum(spectrum: torch.Tensor, subsample: int) -> torch.Tensor:
    """The spectrum of |inverse FFT of ``spectrum`` subsampled by ``subsample``|."""
    if subsample > 1:
        spectrum = _subsample(spectrum, subsample)
    return _fft(_as_complex(_modulus(_ifft(spectrum))))


def _lowpass(spectrum: torch.Tensor, lowpass: torch.Tensor, subsample: int, unpad: Callable) -> torch.Tensor:
    """The real signal of ``spectrum`` low-passed, subsampled by ``subsample`` and unpadded."""
    averaged = _subsample(spectrum * lowpass, subsample)
    return unpad(torch.fft.ifft2(torch.view_as_complex(averaged)).real[..., None])


def _subsample(spectrum: torch.Tensor, k: int) -> torch.Tensor:
    """Subsampling by ``k`` in space is periodisation in frequency: the mean of the k x k
    blocks' spectra (kymatio's ``subsample_fourier``)."""
    *batch, m, n, _ = spectrum.shape
    blocks = spectrum.reshape(-1, k, m // k, k, n // k, 2)
    return blocks.mean(3).mean(1).reshape(*batch, m // k, n // k, 2)


def _as_complex(real: torch.Tensor) -> torch.Tensor:
    """A real signal (..., M, N, 1) as complex values with a zero imaginary part (..., M, N, 2)."""
    return torch.cat([real, torch.zeros_like(real)], dim=-1)


def _modulus(values: torch.Tensor) -> torch.Tensor:
    """|z| of complex values (..., 2), as (..., 1)."""
    return (values[..., 0] * values[..., 0] + values[..., 1] * values[..., 1]).sqrt()[..., None]


def _fft(values: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(torch.fft.fft2(torch.view_as_complex(values)))


def _ifft(values: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(torch.fft.ifft2(torch.view_as_complex(values)))
