"""The IPython profile's startup files, executed strictly (an exception fails the test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROFILE = Path(__file__).resolve().parents[2] / "profile_collection" / "startup"

# Executes each startup file in order in one namespace, as IPython does, but lets any
# exception through (IPython only prints it and exits 0), then runs a scan.
SCRIPT = r"""
import json, sys
from pathlib import Path
ns = {"__name__": "__main__"}
for path in sorted(Path(sys.argv[1]).glob("*.py")):
    exec(compile(path.read_text(), str(path), "exec"), ns)
RE, xmcd = ns["RE"], ns["xmcd"]
uids = RE(ns["count"]([xmcd], num=2), sample="profile-check")
run = ns["store"].runs[uids[0]]
print(json.dumps({"scan_id": run.metadata["start"]["scan_id"],
                  "events": run.metadata["stop"]["num_events"]["primary"],
                  "plans": sorted(k for k in ("xmcd_adaptive_scan", "stxm_image") if k in ns)}))
ns["store"].close()
ns["beamline"].stop()
"""


def _run_profile(tmp_path: Path) -> dict:
    env = dict(os.environ, SMARTBEAM_DATA_DIR=str(tmp_path / "data"),
               SMARTBEAM_MD_DIR=str(tmp_path / "md"), SMARTBEAM_TIME_SCALE="0.02",
               SMARTBEAM_SIM="1", MPLBACKEND="Agg")
    env.pop("EPICS_CA_ADDR_LIST", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(PROFILE)], env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_startup_files_run_strictly_and_scan_id_persists(tmp_path):
    first = _run_profile(tmp_path)
    assert first["events"] == 2
    assert first["plans"] == ["stxm_image", "xmcd_adaptive_scan"]
    second = _run_profile(tmp_path)
    # RunEngine metadata persisted: scan_id continues across sessions.
    assert second["scan_id"] == first["scan_id"] + 1
