"""Build and run one twin IOC: ``python -m sim_devices ioc xmcd|stxm|sans --port N``."""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["DEFAULT_PORTS", "DEFAULT_PREFIXES", "INSTRUMENTS", "STXM_SAMPLES", "add_ioc_arguments",
           "run_ioc", "stxm_sample_from"]

INSTRUMENTS = ("xmcd", "stxm", "sans")
DEFAULT_PREFIXES = {"xmcd": "SIM:XMCD:", "stxm": "SIM:STXM:", "sans": "SIM:SANS:"}
DEFAULT_PORTS = {"xmcd": 5701, "stxm": 5702, "sans": 5703}
STXM_SAMPLES = ("domains", "tendq")


def _shape(text: str) -> tuple[int, int]:
    try:
        ny, nx = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r}: expected NYxNX, e.g. 128x128") from None
    return ny, nx


def add_ioc_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ioc``: instrument, port, prefix, sample and time scaling."""
    parser.add_argument("instrument", choices=INSTRUMENTS, help="which simulated instrument")
    parser.add_argument("--port", type=int, default=None,
                        help="CA server port (default: 5701 xmcd, 5702 stxm, 5703 sans)")
    parser.add_argument("--prefix", default=None,
                        help="PV prefix (default SIM:XMCD:, SIM:STXM:, SIM:SANS:)")
    parser.add_argument("--interface", default="127.0.0.1", help="address to serve on")
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="factor on simulated dwell/motion times (1 = real time)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the counting noise")
    parser.add_argument("--truth", default=None,
                        help="xmcd/stxm: JSON truth file of the XMCD sample, or a preset name "
                             "(Fe, Co, Fe2+_edrixs); default Fe")
    parser.add_argument("--xas", default=None, metavar="ION:TENDQ[:OFFSET]",
                        help="xmcd: serve the isotropic edrixs XAS of an ion instead of an "
                             "XMCD sample, e.g. Mn2+:0.9 (10Dq in eV, optional energy offset)")
    parser.add_argument("--pattern", default="realistic",
                        help="sans: realistic | sharp | anisotropic")
    parser.add_argument("--count-rate", type=float, default=3000.0,
                        help="sans: counts per second on the detector")
    parser.add_argument("--sample", choices=STXM_SAMPLES, default="domains",
                        help="stxm: 'domains' (Fe film with magnetic domains, XMCD) or "
                             "'tendq' (Mn2+ regions of 10Dq 0.6/0.9/1.2 eV and a foreign "
                             "region, for 10Dq maps)")
    parser.add_argument("--shape", type=_shape, default=None,
                        help="sans: detector NYxNX (default 128x128); stxm: field of view "
                             "in pixels (default 100x100)")


def xmcd_sample_from(truth: str | None):
    """An XMCD sample from a preset name or a JSON truth file."""
    from .physics.xmcd import PRESETS, XMCDSample, XMCDTruth, preset

    if truth is None:
        return XMCDSample(preset("Fe"))
    if truth in PRESETS:
        return XMCDSample(preset(truth))
    try:
        return XMCDSample(XMCDTruth.from_json(truth))
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"--truth {truth!r}: not a preset ({', '.join(PRESETS)}) "
                         f"and not a readable JSON truth file ({exc})") from None


def xas_sample_from(spec: str):
    """An edrixs XAS sample from ``ION:TENDQ[:OFFSET]``."""
    from .physics.xas import LibraryXASSample

    parts = spec.split(":")
    try:
        ion, ten_dq = parts[0], float(parts[1])
        offset = float(parts[2]) if len(parts) > 2 else 0.0
    except (IndexError, ValueError):
        raise SystemExit(f"--xas {spec!r}: expected ION:TENDQ[:OFFSET], e.g. Mn2+:0.9") from None
    return LibraryXASSample(ion=ion, ten_dq=ten_dq, edge_offset=offset)


def stxm_sample_from(kind: str, truth: str | None, shape: tuple[int, int]):
    """The STXM field of view: magnetic ``domains`` or Mn2+ ``tendq`` regions."""
    if kind == "tendq":
        from .physics.stxm_xas import STXMXASSample

        return STXMXASSample(shape=shape)
    if kind != "domains":
        raise SystemExit(f"--sample {kind!r}: expected one of {STXM_SAMPLES}")
    from .physics.stxm import STXMSample

    return STXMSample(xmcd_sample_from(truth), shape=shape)


def build_ioc(args: argparse.Namespace):
    """The PVGroup instance for the parsed options."""
    from .iocs import common

    common.set_time_scale(args.time_scale)
    prefix = args.prefix or DEFAULT_PREFIXES[args.instrument]
    if args.instrument == "xmcd":
        from .iocs.xmcd import XMCDEndstationIOC

        sample = xas_sample_from(args.xas) if args.xas else xmcd_sample_from(args.truth)
        return XMCDEndstationIOC(prefix=prefix, sample=sample, seed=args.seed)
    if args.instrument == "stxm":
        from .iocs.stxm import stxm_ioc_class

        sample = stxm_sample_from(getattr(args, "sample", "domains"), args.truth,
                                  args.shape or (100, 100))
        return stxm_ioc_class(sample.extent_um)(prefix=prefix, sample=sample, seed=args.seed)
    from .iocs.sans import sans_ioc_class
    from .physics.sans import SANSSample

    shape = args.shape or (128, 128)
    sample = SANSSample(pattern=args.pattern, shape=shape, count_rate=args.count_rate)
    return sans_ioc_class(shape)(prefix=prefix, sample=sample, seed=args.seed)


def run_ioc(args: argparse.Namespace) -> int:
    """Serve the IOC until interrupted."""
    from caproto.server import run

    from .iocs.common import set_ca_port

    port = args.port or DEFAULT_PORTS[args.instrument]
    set_ca_port(port)
    ioc = build_ioc(args)
    print(f"serving {args.instrument} twin, prefix {ioc.prefix}, "
          f"{args.interface}:{port}, {len(ioc.pvdb)} PVs", flush=True)
    run(ioc.pvdb, interfaces=[args.interface])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sim_devices",
                                     description="Simulated beamline twins over EPICS CA")
    sub = parser.add_subparsers(dest="command", required=True)
    ioc = sub.add_parser("ioc", help="run one twin IOC")
    add_ioc_arguments(ioc)
    args = parser.parse_args(argv)
    try:
        return run_ioc(args)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
