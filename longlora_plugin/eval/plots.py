"""PNG plots of evaluation results (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_passkey", "plot_passkey_heatmap", "plot_perplexity"]


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(6, 4))


def _save(plt, figure, path: Path) -> Path:
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_passkey(accuracy: dict[str, dict[int, float]], path: Path, *, trained_length: int, title: str) -> Path:
    """Passkey accuracy vs length, one line per model."""
    plt, figure, axes = _figure()
    for label, by_length in accuracy.items():
        lengths = sorted(by_length)
        axes.plot(lengths, [100 * by_length[n] for n in lengths], marker="o", label=label)
    axes.axvline(trained_length, color="grey", linestyle=":", linewidth=1)
    axes.set_xlabel("context length (tokens)")
    axes.set_ylabel("passkey accuracy (%)")
    axes.set_ylim(-5, 105)
    axes.set_title(title)
    axes.legend()
    return _save(plt, figure, Path(path))


def plot_perplexity(perplexity: dict[str, dict[int, float]], path: Path, *, title: str) -> Path:
    """Perplexity vs evaluation context length, one line per model."""
    plt, figure, axes = _figure()
    for label, by_length in perplexity.items():
        lengths = sorted(by_length)
        axes.plot(lengths, [by_length[n] for n in lengths], marker="o", label=label)
    axes.set_xlabel("evaluation context length (tokens)")
    axes.set_ylabel("perplexity")
    axes.set_xscale("log", base=2)
    axes.set_title(title)
    axes.legend()
    return _save(plt, figure, Path(path))


def plot_passkey_heatmap(grid: dict[tuple[int, float], float], path: Path, *, title: str) -> Path:
    """Passkey accuracy by depth (rows) and length (columns)."""
    plt, figure, axes = _figure()
    lengths = sorted({length for length, _ in grid})
    depths = sorted({depth for _, depth in grid})
    values = [[100 * grid[(length, depth)] for length in lengths] for depth in depths]
    image = axes.imshow(values, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto", origin="lower")
    axes.set_xticks(range(len(lengths)), [str(n) for n in lengths], rotation=45)
    axes.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    axes.set_xlabel("context length (tokens)")
    axes.set_ylabel("depth of the key")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, label="accuracy (%)")
    return _save(plt, figure, Path(path))
