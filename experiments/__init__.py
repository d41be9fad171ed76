"""Named experiments (``diptych experiment NAME``), each reproducible from one command and writing PNG figures and a
markdown report into an output directory (``docs/experiments`` by default).

Each module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args, out_dir) -> [files]``; common
options (``--out-dir``, ``--quick``, ``--jobs``, ``--no-progress``) are added by the command.
"""

from __future__ import annotations

from importlib import import_module
from types import ModuleType

MODULES = ("diptych.experiments.vtc_fairness", "diptych.experiments.slai_vs_sarathi", "diptych.experiments.pd_split",
           "diptych.experiments.sim_agreement", "diptych.experiments.pd_split_gpu")


def experiments() -> dict[str, ModuleType]:
    found = {}
    for name in MODULES:
        try:
            module = import_module(name)
        except ModuleNotFoundError as exc:  # an experiment not written yet
            if exc.name != name:
                raise
            continue
        found[module.NAME] = module
    return found
