"""The image holds what it runs: the paths the Dockerfile copies, alone in a directory, give a working ``diptych``
CLI and every role's ``--help``."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def copied_paths(dockerfile: Path) -> list[tuple[str, str]]:
    """(source, destination) of every ``COPY`` line (several sources to one destination are split)."""
    pairs = []
    for line in dockerfile.read_text().splitlines():
        if re.match(r"^\s*COPY\s", line):
            parts = [p for p in line.split()[1:] if not p.startswith("--")]
            *sources, dest = parts
            pairs += [(src, dest) for src in sources]
    return pairs


def image_tree(tmp_path: Path) -> Path:
    app = tmp_path / "app"
    app.mkdir()
    for src, dest in copied_paths(ROOT / "Dockerfile"):
        source = ROOT / src
        target = app / src if dest.endswith("/") or dest in (".", "./") else app / dest
        if source.is_dir():
            shutil.copytree(source, target, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return app


def test_dockerfile_copies_every_top_level_package() -> None:
    copied = {src.rstrip("/") for src, _ in copied_paths(ROOT / "Dockerfile")}
    linked = {p.name for p in (ROOT / "diptych").iterdir() if p.is_symlink()}
    assert linked <= copied, f"diptych/ links folders the image lacks: {sorted(linked - copied)}"


@pytest.mark.parametrize("command", [
    ["diptych", "--help"], ["diptych", "simulate", "--help"], ["diptych", "serve", "--help"],
    ["diptych.services.coordinator", "--help"], ["diptych.services.frontend", "--help"],
    ["diptych.services.prefill_worker", "--help"], ["diptych.services.decode_worker", "--help"],
])
def test_commands_run_from_the_image_files(tmp_path: Path, command: list[str]) -> None:
    app = image_tree(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(app)}
    where = subprocess.run([sys.executable, "-c", "import diptych, diptych.engine; print(diptych.engine.__file__)"],
                           cwd=app, env=env, capture_output=True, text=True, timeout=60)
    assert where.returncode == 0, where.stderr
    assert where.stdout.strip().startswith(str(app)), f"imported from outside the image tree: {where.stdout}"
    proc = subprocess.run([sys.executable, "-m", *command], cwd=app, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "usage:" in proc.stdout
