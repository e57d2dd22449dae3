"""Plots (PNG through matplotlib's Agg backend) and Markdown tables, for the synthetic experiments
and the benchmarks."""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

# Figures are built without pyplot, so importing this module leaves matplotlib's backend alone
# (a notebook's inline plots keep working); savefig renders through Agg.
from matplotlib.figure import Figure


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A GitHub Markdown table; ``None`` cells print as an em dash."""
  cell = lambda v: "—" if v is None else str(v)
  lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
  lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def subplots(figsize: tuple[float, float]):
  """A figure with one axes, ``(fig, ax)``."""
  fig = Figure(figsize=figsize)
  return fig, fig.add_subplot()


def save(fig: Figure, path: str | os.PathLike) -> None:
  """Writes ``fig`` as a PNG."""
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def plot_accuracy_vs_step(histories: dict[str, list[dict[str, Any]]], path: str | os.PathLike, *,
                          title: str, chance: float | None = None) -> None:
  """Training accuracy (lines) and validation accuracy (dots) against the step, one colour a model.

  ``histories`` maps a label to the records of :func:`experiments.train.train`.
  """
  fig, ax = subplots(figsize=(6.4, 4.2))
  for i, (label, records) in enumerate(histories.items()):
    color = f"C{i}"
    tr = [r for r in records if r["kind"] == "train"]
    ev = [r for r in records if r["kind"] == "eval"]
    ax.plot([r["step"] for r in tr], [100 * r["accuracy"] for r in tr], color=color, lw=1.2, label=label)
    if ev:
      ax.plot([r["step"] for r in ev], [100 * r["accuracy"] for r in ev], "o", color=color, ms=4)
  if chance is not None:
    ax.axhline(100 * chance, color="gray", ls=":", lw=1, label="chance")
  ax.set(xlabel="step", ylabel="accuracy (%)", title=title, ylim=(0, 101))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  save(fig, path)


def plot_accuracy_vs_length(results: dict[str, dict[int, float | None]], path: str | os.PathLike, *,
                            title: str, train_length: int | None = None,
                            chance: float | None = None) -> None:
  """Test accuracy against the sequence length on a log2 axis; ``None`` (not run) is left out."""
  fig, ax = subplots(figsize=(6.4, 4.2))
  for i, (label, by_length) in enumerate(results.items()):
    pts = sorted((l, a) for l, a in by_length.items() if a is not None)
    ax.plot([l for l, _ in pts], [100 * a for _, a in pts], "o-", color=f"C{i}", ms=4, label=label)
  if train_length is not None:
    ax.axvline(train_length, color="k", ls="--", lw=1, label=f"train length {train_length}")
  if chance is not None:
    ax.axhline(100 * chance, color="gray", ls=":", lw=1, label="chance")
  ax.set_xscale("log", base=2)
  lengths = sorted({l for r in results.values() for l in r})
  if lengths:
    ax.set_xticks(lengths)
    ax.set_xticklabels([f"$2^{{{int(math.log2(l))}}}$" for l in lengths], fontsize=7)
  ax.set(xlabel="test sequence length", ylabel="accuracy (%)", title=title, ylim=(0, 101))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  save(fig, path)
