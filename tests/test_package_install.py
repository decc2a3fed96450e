"""A plain (non-editable) install of the package serves the page: templates and static files are package data."""
from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import ROOT

pytestmark = pytest.mark.slow  # builds a wheel the standard way (pip fetches the build backend: ~10 s)

SERVE = textwrap.dedent("""
    import json, sys
    import chestxray
    from chestxray.serving import create_app

    app = create_app({"CHESTXRAY_ARTIFACTS": "no-model-here", "GEMINI_API_KEY": ""})
    client = app.test_client()
    page, script, style = client.get("/"), client.get("/static/app.js"), client.get("/static/style.css")
    print(json.dumps({"package": chestxray.__file__, "page": [page.status_code, page.get_data(as_text=True)],
                      "script": [script.status_code, len(script.data)], "style": [style.status_code, len(style.data)]}))
""")


def test_a_wheel_install_serves_the_upload_page_and_static_files(tmp_path):
    import json

    # Built from a copy: a build in the checkout would leave build/ and *.egg-info behind.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(wheels), str(source)], check=True)
    wheel = next(wheels.glob("chestxray-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True)

    # Run away from the checkout, with the installed copy first on the path (dependencies from this venv).
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    result = subprocess.run([sys.executable, "-c", SERVE], cwd=run_dir, capture_output=True, text=True,
                            env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "2"},
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    served = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(served["package"]).is_relative_to(target)  # the installed copy, not the source tree
    status, page = served["page"]
    assert status == 200 and 'type="file"' in page and "/static/app.js" in page
    assert served["script"][0] == 200 and served["script"][1] > 1000
    assert served["style"][0] == 200 and served["style"][1] > 100
