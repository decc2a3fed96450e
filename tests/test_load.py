"""bench/load.py at small scale: the tiny model under gunicorn, 4 clients x 200 real full-size uploads."""
from __future__ import annotations

import sys

import pytest
from helpers import ROOT, free_port

pytestmark = pytest.mark.slow


def test_load_has_no_errors_and_steady_memory(tiny_artifacts, fullsize_dir, tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import load

    result = load.run(tiny_artifacts, clients=4, n_requests=200, max_seconds=600, port=free_port(), backend="keras",
                      log_dir=tmp_path)
    print("\n" + load.report(result))
    assert result["n"] == 200 and result["warm_up"]["errors"] == 0
    assert result["statuses"] == {"200": 200}
    assert result["rss_growth_pct"] < 10
    assert result["audit_lines"] == 200 + load.WARM_UP  # every request audited, none twice
