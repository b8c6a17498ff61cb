# smartbeam beamline session, part 2: the instruments.
from smartbeam.beamline import make_devices

_devices = make_devices(beamline.prefixes, calibration=beamline.calibration)
xmcd = _devices.get("xmcd")
stxm = _devices.get("stxm")
sans_det = _devices.get("sans")
xas = _devices.get("xas")

# Pause a plan when an instrument's IOC disconnects or stops answering, resume (settings
# restored) when it is back.
from smartbeam.faults import install_ioc_suspenders

ioc_suspenders = install_ioc_suspenders(RE, [d for d in _devices.values() if d is not None])
