"""Split one labelled pool into unbalanced, non-IID hospital sites."""

from __future__ import annotations

import numpy as np


def dirichlet_partition(
    labels: np.ndarray,
    n_sites: int,
    *,
    alpha: float | None = 0.5,
    quantity_alpha: float | None = None,
    seed: int = 0,
    min_site_size: int = 10,
    max_tries: int = 100,
) -> list[np.ndarray]:
    """Indices of each site, seeded and reproducible.

    * Label skew: each class is spread over the sites by proportions drawn from
      Dirichlet(``alpha``); small alpha gives sites dominated by few classes, ``None``
      keeps every site's class mix equal to the pool's.
    * Quantity skew: each site's share of the pool is drawn from
      Dirichlet(``quantity_alpha``); small values give very unequal sizes, ``None`` gives
      equal expected sizes.

    Draws repeat (with the same seed stream) until every site has ``min_site_size`` images.
    """
    if n_sites < 1:
        raise ValueError(f"the number of sites must be at least 1, got {n_sites}")
    for name, value in (("alpha", alpha), ("quantity_alpha", quantity_alpha)):
        if value is not None and value <= 0:
            raise ValueError(f"{name} must be positive (or None), got {value}")
    if n_sites * min_site_size > len(labels):
        raise ValueError(f"{len(labels)} images cannot give {n_sites} sites at least {min_site_size} images each")
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        sites = _draw(labels, n_sites, alpha, quantity_alpha, rng)
        if min(len(site) for site in sites) >= min_site_size:
            return sites
    raise ValueError(
        f"no draw in {max_tries} tries gave each of {n_sites} sites at least {min_site_size} images; "
        "raise alpha or quantity_alpha, or use fewer sites"
    )


def _draw(
    labels: np.ndarray,
    n_sites: int,
    alpha: float | None,
    quantity_alpha: float | None,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    share = rng.dirichlet([quantity_alpha] * n_sites) if quantity_alpha else np.full(n_sites, 1 / n_sites)
    members: list[list[int]] = [[] for _ in range(n_sites)]
    for label in np.unique(labels):
        indices = rng.permutation(np.flatnonzero(labels == label))
        mix = rng.dirichlet([alpha] * n_sites) if alpha else np.ones(n_sites)
        weights = mix * share
        cuts = np.rint(np.cumsum(weights / weights.sum())[:-1] * len(indices)).astype(int)
        for site, chunk in enumerate(np.split(indices, cuts)):
            members[site].extend(chunk.tolist())
    return [np.sort(np.asarray(m, dtype=np.int64)) for m in members]


def class_table(
    sites: list[np.ndarray], labels: np.ndarray, classes: tuple[str, ...], names: list[str] | None = None
) -> str:
    """A plain-text table of images per class and site, with totals."""
    names = names or [f"site-{i + 1}" for i in range(len(sites))]
    counts = np.array([np.bincount(labels[s], minlength=len(classes)) for s in sites])
    header = ["site", *classes, "total"]
    rows = [[name, *map(str, row), str(row.sum())] for name, row in zip(names, counts)]
    rows.append(["total", *map(str, counts.sum(axis=0)), str(counts.sum())])
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), *(line(r) for r in rows)])
