"""Draws a run's curves from metrics.jsonl into one PNG: loss (with every eval's validation loss),
learning rate, temperature t, bias b and every eval recall.

    python tools/plot.py /tmp/demo/metrics.jsonl --output /tmp/demo/curves.png
"""
from __future__ import annotations

import argparse
import math
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from siglip_jax.runtime import cli
from siglip_jax.training import metrics  # noqa: E402


def read_metrics(path: str) -> list[dict]:
    """Records of a metrics.jsonl; a torn line is dropped with a warning (see metrics.read_jsonl)."""
    return metrics.read_jsonl(path)


def plot(records: list[dict], output: str) -> list[str]:
    """Writes the figure; returns the panel titles drawn."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    validation_losses = sorted({key for record in records for key in record if key.endswith("/loss")})
    panels: list[tuple[str, list[str]]] = [
        ("loss", ["loss", *validation_losses]),
        ("learning rate", ["learning_rate"]),
        ("temperature exp(t)", ["temperature"]),
        ("bias b", ["bias"]),
    ]
    recall_keys = sorted({key for record in records for key in record if "recall" in key})
    if recall_keys:
        panels.append(("eval recall", recall_keys))
    panels = [(title, keys) for title, keys in panels if any(key in record for record in records for key in keys)]
    if not panels:
        raise ValueError("No plottable metrics (loss, learning_rate, temperature, bias, *recall*) in the file.")
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.4 * rows), squeeze=False)
    for axis, (title, keys) in zip(axes.flat, panels):
        for key in keys:
            # None is a metric that was NaN or Inf: drawn as a gap.
            points = [(record["step"], math.nan if record[key] is None else record[key]) for record in records if key in record]
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o" if len(points) < 20 else None, label=key)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if len(keys) > 1:
            axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(panels):]:
        axis.axis("off")
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    figure.savefig(output, dpi=100)
    plt.close(figure)
    return [title for title, _ in panels]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", help="a metrics.jsonl written by train.py")
    parser.add_argument("--output", default=None, help="PNG path (default: beside the metrics file)")
    args = parser.parse_args()
    output = args.output or os.path.join(os.path.dirname(os.path.abspath(args.metrics)), "curves.png")
    titles = plot(read_metrics(args.metrics), output)
    print(f"Wrote {output}: {', '.join(titles)}")


if __name__ == "__main__":
    cli.run(main)
