"""Guard: the repository's ``platform/`` folder must never shadow the standard library (FLIQS.md section 6).

Ray calls ``platform.system()`` in every worker; with the repository root on ``sys.path`` (running from the
root, Ray's ``working_dir``) a ``platform/__init__.py`` would kill them all.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# `python -c` puts the current directory ('') first on sys.path, as Ray's working_dir does for workers.
PROBE = """
import json, sys
assert sys.path[0] == ''
import platform
info = {"platform_file": getattr(platform, "__file__", None), "system": None, "fliqs_formats": None}
info["system"] = platform.system()
import fliqs.quant.formats, fliqs.searchers, fliqs.trainables, fliqs.conf
info["fliqs_formats"] = fliqs.quant.formats.__file__
print(json.dumps(info))
"""


def _probe(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_no_init_in_platform_folder():
    assert (REPO_ROOT / "platform").is_dir()
    assert not (REPO_ROOT / "platform" / "__init__.py").exists()


def test_stdlib_platform_wins_from_the_repo_root():
    proc = _probe(REPO_ROOT)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["system"]  # e.g. "Linux": the standard library function exists and works
    platform_file = Path(out["platform_file"]).resolve()
    assert REPO_ROOT not in platform_file.parents, platform_file
    assert Path(out["fliqs_formats"]).resolve() == REPO_ROOT / "platform" / "quant" / "formats.py"


def test_probe_detects_a_shadowing_package(tmp_path):
    """The guard above can fail: a folder `platform/` *with* `__init__.py` on the path shadows the stdlib."""
    (tmp_path / "platform").mkdir()
    (tmp_path / "platform" / "__init__.py").write_text("")
    proc = _probe(tmp_path)
    assert proc.returncode != 0
    assert "system" in proc.stderr  # AttributeError: module 'platform' has no attribute 'system'
