"""search/ as a package run by path: ``python search/run.py`` puts search/ itself first on sys.path.

There, and on every Ray worker (Ray adds the driver script's folder to the workers' sys.path), a
module ``search/select.py`` would *be* ``import select`` for the whole process -- the standard
library's, asyncio's, Ray's -- and break everything far from the cause. So no module in search/
may share its name with an importable top-level module, and the scripts need no sys.path lines.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

SEARCH = Path(__file__).resolve().parent.parent / "search"
MODULES = sorted(p.stem for p in SEARCH.glob("*.py") if p.stem != "__init__")


def test_no_search_module_shadows_an_importable_module(tmp_path: Path) -> None:
    # From a neutral folder, with this interpreter's installed packages: what `import <name>` would find.
    code = (
        "import importlib.util, json, sys\n"
        f"names = {MODULES!r}\n"
        "print(json.dumps([n for n in names if n in sys.stdlib_module_names or importlib.util.find_spec(n)]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [], "rename these search/ modules: they shadow importable modules"
    assert "select" not in MODULES and "run" in MODULES  # the check sees the real folder


def test_the_scripts_need_no_sys_path_lines() -> None:
    edits = re.compile(r"sys\.path\s*(\[|=|\.insert|\.append|\.extend)")
    offenders = [p.name for p in SEARCH.glob("*.py") if edits.search(p.read_text())]
    assert offenders == []


def test_retrain_script_runs_by_path_from_another_folder(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(SEARCH / "retrain.py"), "--help"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python search/retrain.py") and "--experiment" in proc.stdout
