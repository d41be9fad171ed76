"""What the named experiments share: parallel runs with a progress bar, markdown tables, figures, output files."""

from __future__ import annotations

import math
import multiprocessing
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm


def default_jobs() -> int:
    return max(1, min(os.cpu_count() or 1, 2))


def parallel_map(fn: Callable[[Any], Any], items: Sequence[Any], jobs: int, desc: str,
                 progress: bool = True) -> list[Any]:
    """``[fn(x) for x in items]`` over ``jobs`` processes (``fn`` must be a module-level function), in order, with a
    progress bar."""
    items = list(items)
    bar = tqdm(total=len(items), desc=desc, unit="run", disable=not progress)
    try:
        if jobs <= 1 or len(items) <= 1:
            out = []
            for item in items:
                out.append(fn(item))
                bar.update()
            return out
        context = multiprocessing.get_context("fork" if hasattr(os, "fork") else "spawn")
        results: list[Any] = [None] * len(items)
        with context.Pool(jobs) as pool:
            for index, value in pool.imap_unordered(_indexed, [(fn, i, x) for i, x in enumerate(items)]):
                results[index] = value
                bar.update()
        return results
    finally:
        bar.close()


def _indexed(job: tuple[Callable[[Any], Any], int, Any]) -> tuple[int, Any]:
    fn, index, item = job
    return index, fn(item)


def add_max_tokens_argument(parser: Any, name: str,
                            context: str = "the cost model's model context (32768 for Mistral-7B, 4096 for "
                                           "Llama-2-7B), or one simulated worker's KV pool where smaller") -> None:
    """The ``--max-tokens`` policy option (``workloads.max_tokens``) of experiment ``name``, whose context is
    ``context``. Every result recorded in ``docs/experiments`` before the policy existed used oracle caps; the help
    says so and how to reproduce them."""
    from diptych.workloads.max_tokens import DEFAULT_MAX_TOKENS, MAX_TOKENS_HELP

    parser.add_argument("--max-tokens", default=DEFAULT_MAX_TOKENS, metavar="oracle|N|context",
                        help=f"{MAX_TOKENS_HELP}; the context is {context}. The results in "
                             f"docs/experiments/{name}.md were produced with oracle caps (--max-tokens oracle "
                             "reproduces them); the default is now the fixed cap [%(default)s]")


def parse_names(text: str, choices: Iterable[str], what: str) -> list[str]:
    """Comma-separated names from an option, each one of ``choices``; ``ValueError`` names the first unknown one."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    known = list(choices)
    for name in names:
        if name not in known:
            raise ValueError(f"unknown {what} {name!r}; choose from {', '.join(known)}")
    return names


def parse_numbers(text: str, flag: str, kind: type = float) -> list:
    """Comma-separated positive numbers from option ``flag`` (``kind``: float or int); ``ValueError`` otherwise."""
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated numbers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise ValueError(f"{flag} must be positive")
    return values


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
            return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.2e}"
        return f"{value:.{digits}g}"
    return str(value)


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(v) for v in row) + " |")
    return "\n".join(lines)


def pyplot():
    """matplotlib's pyplot on the Agg backend, or None (with a warning) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'diptych[plots]'): writing tables without figures")
        return None
    return plt


def save_figure(fig: Any, out_dir: Path, name: str) -> Path:
    path = out_dir / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def write_markdown(out_dir: Path, name: str, text: str) -> Path:
    path = out_dir / f"{name}.md"
    path.write_text(text.rstrip() + "\n")
    return path
