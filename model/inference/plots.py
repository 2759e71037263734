"""PNG figures for `python -m model.explore`: next-token bar charts and attention heatmaps.

matplotlib is imported inside each function, and through `matplotlib.figure.Figure` rather than
pyplot: no GUI backend, no global figure state, and `import model` stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from model.errors import ConfigError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from model.inference.analysis import AttentionMap, NextToken


def _label(token: str) -> str:
    # repr shows spaces and newlines; "$" would otherwise start matplotlib's math mode.
    return repr(token).replace("$", r"\$")


def _save(fig: Figure, path: Path) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    except OSError as exc:
        raise ConfigError(f"--out: cannot write {str(path)!r} ({exc.strerror})") from exc
    return path


def plot_next_token(result: NextToken, path: Path) -> Path:
    """Grouped bars: the top tokens' probabilities, one bar per temperature."""
    from matplotlib.figure import Figure

    n, temps = len(result.top), result.temperatures
    fig = Figure(figsize=(max(6.0, 0.6 * n + 2), 4.5), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(temps)
    for j, t in enumerate(temps):
        xs = [i + (j - (len(temps) - 1) / 2) * width for i in range(n)]
        ax.bar(xs, result.probs[j], width, label=f"T = {t:g}")
    ax.set_xticks(range(n), [_label(s.token) for s in result.top], rotation=45, ha="right")
    ax.set_ylabel("probability of the next token")
    ax.set_ylim(0, 1)
    prompt = "".join(result.prompt)
    prompt = prompt if len(prompt) <= 60 else "..." + prompt[-57:]
    ax.set_title(f"next token after {_label(prompt)}")
    ax.legend(title="temperature")
    return _save(fig, path)


def plot_attention(result: AttentionMap, path: Path) -> Path:
    """Heatmap: row i is how position i spreads its attention over positions 0..i."""
    from matplotlib.figure import Figure

    T = len(result.tokens)
    side = min(16.0, 3.0 + 0.4 * T)
    fig = Figure(figsize=(side + 1.5, side), layout="constrained")
    ax = fig.add_subplot()
    # Future positions are masked out, not merely ignored: leave them blank (NaN) rather than 0.
    grid = [[w if j <= i else float("nan") for j, w in enumerate(row)]
            for i, row in enumerate(result.weights)]
    image = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=1.0)
    labels = [_label(t) for t in result.tokens]
    ax.set_xticks(range(T), labels, rotation=90)
    ax.set_yticks(range(T), labels)
    ax.set_xlabel("attended position (key)")
    ax.set_ylabel("attending position (query)")
    which = f"head {result.head}" if result.head is not None else f"mean of {result.n_heads} heads"
    ax.set_title(f"attention, layer {result.layer}, {which}")
    fig.colorbar(image, ax=ax, label="attention weight")
    return _save(fig, path)
