"""Real EPICS: the device classes against the caproto twins, runs written to real Tiled."""

from __future__ import annotations

import time

import bluesky.plan_stubs as bps
import numpy as np
import pytest
from bluesky.plans import count, list_scan
from ophyd.utils import LimitError

from smartbeam.devices import DeviceConnectionError, XMCDEndstation, connect_devices
from smartbeam.errors import SmartbeamInputError
from smartbeam.plans import stxm_image
from smartbeam.storage import find_runs, read_stream


def test_xmcd_scan_both_helicities_written_and_found(beamline_devices, storage, RE):
    xmcd = beamline_devices["xmcd"]
    RE.subscribe(storage.writer())
    energies = [700.0, 707.8, 712.0]
    uids = []
    for mode in ("circ+", "circ-"):
        RE(bps.mv(xmcd.pol.mode, mode, xmcd.dwell, 0.1))
        uids += RE(list_scan([xmcd], xmcd.energy, energies),
                   sample="Fe film", helicity=mode)
    found = find_runs(storage.runs, sample="Fe film", plan_name="list_scan")
    assert {r.metadata["start"]["uid"] for r in found} >= set(uids)
    data = {}
    for uid in uids:
        run = storage.runs[uid]
        arrays = read_stream(run, "primary")
        np.testing.assert_allclose(arrays["xmcd_energy"], energies, atol=1e-3)
        data[run.metadata["start"]["helicity"]] = arrays["xmcd_tey"] / arrays["xmcd_i0"]
    # The L3 white line of the Fe twin shows dichroism: mu+ and mu- differ at 707.8 eV
    # by far more than the counting noise, and agree in the pre-edge.
    diff = data["circ+"] - data["circ-"]
    assert abs(diff[1]) > 10 * abs(diff[0])
    assert data["circ+"][1] > 2 * data["circ+"][0]


def test_sans_frames_keep_shape_dtype_and_dims(beamline_devices, storage, RE):
    sans = beamline_devices["sans"]
    RE.subscribe(storage.writer())
    RE(bps.mv(sans.shutter, "open", sans.acquire_time, 2.0, sans.attenuator, 1.0))
    (uid,) = RE(count([sans], num=3), sample="silica")
    run = storage.runs[uid]
    frames = run["primary"]["sans_det_image"].read()
    assert frames.shape == (3, 128, 128)
    assert frames.dtype == np.int32
    totals = read_stream(run, "primary")["sans_det_total_counts"]
    np.testing.assert_array_equal(frames.reshape(3, -1).sum(axis=1), totals)
    # Count rate 3000/s for 2 s: Poisson total within 5 sd.
    assert np.all(np.abs(totals - 6000) < 5 * np.sqrt(6000))
    dims = run["primary"].descriptors[0]["data_keys"]["sans_det_image"]["dims"]
    assert len(set(dims)) == 2


def test_sans_closed_shutter_gives_dark_frame(beamline_devices, RE):
    sans = beamline_devices["sans"]
    RE(bps.mv(sans.shutter, "closed"))
    sans.trigger().wait(5)
    assert sans.total_counts.get() == 0


def test_stxm_image_plan_reads_field_of_view(beamline_devices, storage, RE):
    stxm = beamline_devices["stxm"]
    RE.subscribe(storage.writer())
    (uid,) = RE(stxm_image(stxm, x_range=[0.0, 1.5], y_range=[0.0, 0.9], pixel=0.03,
                           energies=[707.8], dwell=0.001))
    run = storage.runs[uid]
    images = run["primary"]["stxm_det_image"].read()
    assert images.shape == (2, 31, 51)
    pol = read_stream(run, "primary")["stxm_pol_mode"]
    assert list(pol) == ["circ+", "circ-"]
    # Magnetic domains give XMCD contrast between the two helicity images.
    ratio = np.log(images[0].astype(float) + 1) - np.log(images[1].astype(float) + 1)
    assert ratio.std() > 0.02
    zp = read_stream(run, "primary")["stxm_zp_z"][0]
    assert zp == pytest.approx(-240.0 * 25.0 * 707.8 / 1239.84193, rel=1e-3)


def test_energy_outside_limits_refused_before_motion(beamline_devices, storage, RE):
    xmcd = beamline_devices["xmcd"]
    before = xmcd.energy.setpoint.get()
    with pytest.raises(LimitError, match="outside the axis limits"):
        xmcd.energy.move(1200.0)
    assert xmcd.energy.setpoint.get() == before
    # Through a plan: the run that tried it is closed with exit status "fail", not
    # left half-written.
    RE.subscribe(storage.writer())
    with pytest.raises(LimitError):
        RE(list_scan([xmcd], xmcd.energy, [1200.0]), sample="limits-check")
    (run,) = find_runs(storage.runs, sample="limits-check")
    assert run.metadata["stop"]["exit_status"] == "fail"


def test_stxm_raster_beyond_stage_refused(beamline_devices, RE):
    stxm = beamline_devices["stxm"]
    with pytest.raises(SmartbeamInputError, match="beyond the stage limits"):
        RE(stxm_image(stxm, x_range=[0.0, 50.0], y_range=[0.0, 1.0], pixel=0.03,
                      energies=[707.8]))
    with pytest.raises(SmartbeamInputError, match="larger than"):
        RE(stxm_image(stxm, x_range=[0.0, 0.01], y_range=[0.0, 1.0], pixel=0.03,
                      energies=[707.8]))


def test_wrong_prefix_names_pv_and_address_list(iocs):
    bad = XMCDEndstation("NO:SUCH:", name="bad")
    t0 = time.monotonic()
    with pytest.raises(DeviceConnectionError) as err:
        connect_devices(bad, timeout=1.5)
    assert time.monotonic() - t0 < 10
    message = str(err.value)
    assert "NO:SUCH:" in message
    assert "EPICS_CA_ADDR_LIST" in message
