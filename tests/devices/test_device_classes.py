"""Device classes: PV names from prefixes, input checks that need no IOC."""

from __future__ import annotations

import pytest

from smartbeam.devices import STXM, SANSDetector, XMCDEndstation
from smartbeam.errors import SmartbeamInputError


def test_pv_names_come_from_the_prefix():
    xmcd = XMCDEndstation("BL7:XMCD:", name="xmcd")
    assert xmcd.energy.setpoint.pvname == "BL7:XMCD:Energy:SP"
    assert xmcd.energy.readback.pvname == "BL7:XMCD:Energy:RBV"
    assert xmcd.energy.done.pvname == "BL7:XMCD:Energy:DMOV"
    assert xmcd.pol.mode.setpoint_pvname == "BL7:XMCD:Pol:SP"
    assert xmcd.tey.pvname == "BL7:XMCD:TEY"
    stxm = STXM("X:", name="stxm")
    assert stxm.det.image.pvname == "X:Det:Img:Array"
    assert stxm.x.setpoint.pvname == "X:SampleX:SP"


def test_reading_keys_are_named_after_the_device():
    xmcd = XMCDEndstation("P:", name="xmcd")
    assert xmcd.energy.readback.name == "xmcd_energy"
    assert {xmcd.i0.name, xmcd.tey.name, xmcd.tfy.name} == {"xmcd_i0", "xmcd_tey", "xmcd_tfy"}
    sans = SANSDetector("P:", name="sans_det", shape=(64, 96))
    assert sans.image.name == "sans_det_image"
    assert sans.image.image_shape == (64, 96)


def test_bad_detector_shape_refused():
    with pytest.raises(ValueError, match="shape"):
        SANSDetector("P:", name="bad", shape=(128,))


def test_unknown_polarisation_refused_before_any_put():
    xmcd = XMCDEndstation("NOT:CONNECTED:", name="xmcd")
    with pytest.raises(SmartbeamInputError, match="circ\\+, circ-, linear"):
        xmcd.pol.mode.check_value("elliptical")
