"""The health probe of a model repository: the very script its deployments run, loaded from the repository.

Its one home is model_repository/health_probe.py; the export puts it at the
root of every repository it writes, where docker-compose and the KServe
runtimes run it. The supervisor probes with the same file, read from the
repository it serves, so the probe it trusts is the one the deployments run.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Optional

PROBE_FILENAME = "health_probe.py"


def load_health_probe(repository: Path) -> Optional[ModuleType]:
    """`repository`'s health_probe.py as a module; None for a repository without one (nothing to probe)."""
    path = Path(repository) / PROBE_FILENAME
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("safety_checker_health_probe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
