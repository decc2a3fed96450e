"""Under CI a missing ../shared is a failure that says what is missing; locally it is a skip."""
from __future__ import annotations

import os
import subprocess
import sys

from helpers import ROOT

PROBE = """
def test_needs_the_real_data(kermany224):
    assert kermany224.is_dir()
"""


def _run_probe(tmp_path, ci: str | None):
    (tmp_path / "test_probe.py").write_text(PROBE)
    # The project's own conftest, loaded under another name (a conftest importing `conftest` would import itself).
    (tmp_path / "conftest.py").write_text(
        f"import importlib.util, sys\nsys.path.insert(0, {str(ROOT / 'tests')!r})  # its helpers module\n"
        f"spec = importlib.util.spec_from_file_location('project_conftest', {str(ROOT / 'tests' / 'conftest.py')!r})\n"
        "project = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(project)\n"
        "kermany224 = project.kermany224\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["CHESTXRAY_SHARED"] = str(tmp_path / "no-shared-here")
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_missing_data_fails_under_ci_with_the_reason(tmp_path):
    result = _run_probe(tmp_path, "true")
    assert result.returncode == 1, result.stdout
    assert "1 error" in result.stdout and "real data not found at" in result.stdout  # fails in the fixture
    assert "no-shared-here" in result.stdout and "CHESTXRAY_SHARED" in result.stdout


def test_missing_data_is_a_skip_with_the_reason_locally(tmp_path):
    result = _run_probe(tmp_path, None)
    assert result.returncode == 0, result.stdout
    assert "1 skipped" in result.stdout and "real data not found at" in result.stdout
