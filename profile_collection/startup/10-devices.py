# smartbeam beamline session, part 2: the instruments.
from smartbeam.beamline import make_devices

_devices = make_devices(beamline.prefixes, calibration=beamline.calibration)
xmcd = _devices.get("xmcd")
stxm = _devices.get("stxm")
sans_det = _devices.get("sans")
xas = _devices.get("xas")
