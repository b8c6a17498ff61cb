"""10Dq end to end: xas_tendq_scan on the caproto XAS twin -> session chain -> Tiled.

The twin endstation IOC serves an edrixs Mn2+ spectrum (on the library grid, and off it
with an energy offset). The EPICS address list is read once when ophyd is imported, and
conftest already fixed it for the session twins, so the check runs in a subprocess that
starts its own IOCs and configures Channel Access itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# Twin spec (ION:TENDQ[:OFFSET]) and the true 10Dq / offset.
CASES = [("Mn2+:0.9", 0.9, 0.0), ("Mn2+:1.25:0.5", 1.25, 0.5)]

SCRIPT = r"""
import json, sys
from pathlib import Path

from sim_devices.launcher import IOCProcess
from smartbeam.epics_env import configure_epics

tmp = Path(sys.argv[1])
cases = json.loads(sys.argv[2])
iocs = [IOCProcess("xmcd", prefix=f"XAS{i}:", log_path=str(tmp / f"ioc{i}.log"),
                   extra_args=["--xas", spec, "--time-scale", "0.02", "--seed", str(i + 1)])
        for i, (spec, _, _) in enumerate(cases)]
store = None
try:
    for ioc in iocs:
        ioc.start(timeout=180)  # an off-grid 10Dq is computed with edrixs first
    configure_epics([ioc.port for ioc in iocs])
    from bluesky import RunEngine
    from bluesky.plans import count

    from smartbeam.callbacks.tendq import estimate_stored_run
    from smartbeam.devices import XMCDEndstation, connect_devices
    from smartbeam.plans import xas_tendq_scan
    from smartbeam.session import analysis_chain
    from smartbeam.storage import Storage, find_runs, read_stream

    store = Storage(tmp / "tiled").open()
    RE = RunEngine({})
    RE.subscribe(analysis_chain(store.writer(), png_dir=tmp))
    out = {"cases": []}
    for i, (spec, dq, off) in enumerate(cases):
        xmcd = XMCDEndstation(iocs[i].prefix, name="xmcd")
        connect_devices(xmcd, timeout=10)
        RE(xas_tendq_scan(xmcd, 628.0, 668.0, num=121, dwell=0.2, md={"sample": spec}))
        # Found again by a metadata query, as a user would after the run.
        runs = find_runs(store.runs, plan_name="xas_tendq_scan", sample=spec)
        run = runs[-1]
        row = {k: (v[0].item() if hasattr(v[0], "item") else v[0])
               for k, v in read_stream(run, "analysis").items()}
        row = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in row.items()}
        post = estimate_stored_run(run)
        out["cases"].append({"spec": spec, "row": row, "post": post,
                             "tendq_md": run.metadata["start"]["tendq"],
                             "primary_events": run.metadata["stop"]["num_events"]["primary"]})
    # A run without the tendq entry passes the chain untouched (no analysis stream).
    uid, = RE(count([xmcd], num=2), sample="plain-count")
    out["plain_streams"] = sorted(store.runs[uid])
    print(json.dumps(out, default=str))
finally:
    if store is not None:
        store.close()
    for ioc in iocs:
        ioc.stop()
"""


@pytest.mark.slow
def test_xas_tendq_scan_on_twin_writes_analysis_stream(tmp_path):
    env = dict(os.environ, SMARTBEAM_CACHE_DIR=str(tmp_path / "libcache"), MPLBACKEND="Agg",
               OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    env.pop("EPICS_CA_ADDR_LIST", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), json.dumps(CASES)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["plain_streams"] == ["primary"]
    for (spec, dq, off), case in zip(CASES, out["cases"], strict=True):
        row, post = case["row"], case["post"]
        assert case["primary_events"] == 121
        assert case["tendq_md"]["ion"] == "Mn2+"
        assert case["tendq_md"]["intensity_key"] == "xmcd_tey"
        assert row["error"] == "", row["error"]
        assert row["described"], row
        assert row["ten_dq"] == pytest.approx(dq, abs=0.05), (spec, row)
        assert row["offset"] == pytest.approx(off, abs=0.1), (spec, row)
        assert row["library_id"] and '"ion": "Mn2+"' in row["library_params"]
        # Post hoc on the stored run: the same estimator, the same answer.
        assert post["error"] == ""
        assert post["ten_dq"] == pytest.approx(row["ten_dq"], abs=1e-9)
        assert post["offset"] == pytest.approx(row["offset"], abs=1e-9)
