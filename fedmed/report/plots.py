"""The report's figures as PNG bytes, drawn with matplotlib (no display needed)."""

from __future__ import annotations

import io

from fedmed.report.document import Figure
from fedmed.report.site import SiteAccount


def report_figures(report: dict) -> tuple[list[Figure], dict[str, bytes]]:
    """Figures for ``report`` and their PNG bytes, by file name."""
    import matplotlib

    matplotlib.use("Agg")
    figures, images = [], {}
    epsilon = _epsilon_plot(report)
    if epsilon is not None:
        figures.append(
            Figure(
                "epsilon.png",
                "Cumulative epsilon per site (solid: ledger, PLD; dotted: RDP second opinion; dashed: budget)",
            )
        )
        images["epsilon.png"] = epsilon
    run = report["run"]
    if run and run["rounds"]:
        figures.append(Figure("validation.png", "Validation of the global model after each round"))
        images["validation.png"] = _validation_plot(run)
        figures.append(Figure("sites.png", "Sites per round"))
        images["sites.png"] = _sites_plot(run)
    return figures, images


def _epsilon_plot(report: dict) -> bytes | None:
    import matplotlib.pyplot as plt

    run = report["run"]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    drawn = False
    # Without ledgers (a deployment's coordinator), plot what the sites reported.
    accounts = [SiteAccount.from_json(a) for a in report["sites"]]
    sites = [(a.site, a.rounds, a.budget) for a in accounts] or [(s, [], None) for s in (run["sites"] if run else [])]
    for index, (site, ledger_rounds, budget) in enumerate(sites):
        colour = f"C{index % 10}"
        rows = [
            r
            for r in ledger_rounds
            if r["dp"] and r["epsilon"] is not None and (run is None or r["run_id"] == run["run_id"])
        ]
        if run is not None:
            reported = [
                (r["round"], r["sites"][site]["epsilon"])
                for r in run["rounds"]
                if site in r["trained"] and r["sites"][site]["epsilon"] is not None
            ]
            xs = [x for x, _ in reported]
            ys = [y for _, y in reported]
            second = [(r["round"], r["epsilon_second_opinion"]) for r in rows]
        else:
            xs = list(range(1, len(rows) + 1))
            ys = [r["epsilon"] for r in rows]
            second = [(i, r["epsilon_second_opinion"]) for i, r in enumerate(rows, start=1)]
        if ys:
            ax.plot(xs, ys, marker="o", color=colour, label=site)
            drawn = True
        second = [(x, y) for x, y in second if y is not None]
        if second:
            ax.plot([x for x, _ in second], [y for _, y in second], linestyle=":", color=colour)
        if budget is not None and (ys or second):
            ax.axhline(budget, linestyle="--", linewidth=1, color=colour)
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("round" if run is not None else "rounds trained (all runs, in order)")
    _whole_numbers(ax.xaxis)
    ax.set_ylabel("cumulative epsilon")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _png(fig)


def _validation_plot(run: dict) -> bytes:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2))
    rounds = run["rounds"]
    series = [
        ("sites' validation AUROC", "validation", "auroc"),
        ("sites' validation accuracy", "validation", "accuracy"),
        ("sites' validation balanced accuracy", "validation", "balanced_accuracy"),
        ("held-out AUROC (coordinator)", "server_validation", "auroc"),
    ]
    for label, source, key in series:
        points = [(r["round"], r[source][key]) for r in rounds if r[source] and r[source].get(key) is not None]
        if points:
            ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=label)
    ax.set_xlabel("round")
    _whole_numbers(ax.xaxis)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _png(fig)


def _sites_plot(run: dict) -> bytes:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.2))
    rounds = [r["round"] for r in run["rounds"]]
    trained = [len(r["trained"]) for r in run["rounds"]]
    refused = [len(r["budget_exhausted"]) for r in run["rounds"]]
    lost = [len(r["rejected"]) + len(r["failed"]) + len(r["missing"]) for r in run["rounds"]]
    ax.bar(rounds, trained, label="trained", color="C2")
    ax.bar(rounds, refused, bottom=trained, label="budget exhausted", color="C1")
    ax.bar(
        rounds, lost, bottom=[a + b for a, b in zip(trained, refused)], label="rejected, failed or missing", color="C3"
    )
    ax.set_xlabel("round")
    ax.set_ylabel("sites")
    _whole_numbers(ax.xaxis)
    _whole_numbers(ax.yaxis)
    ax.legend(fontsize="small", loc="lower right")
    return _png(fig)


def _whole_numbers(axis) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()
