"""Bad user input: reader fuzzing, plan arguments through the RunEngine, CLI arguments,
and no plan argument ever evaluated as code."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from bluesky import RunEngine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smartbeam.readers.nist_sans import read_nist_sans
from smartbeam.readers.spectra import read_spectrum

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

# byte strings that look a little like the real formats, and arbitrary ones
_numbers = st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=12).map(
    lambda xs: "\n".join(f"{x} {x * 2}" for x in xs).encode())
_msa = st.lists(st.sampled_from([b"#FORMAT : EMSA/MAS Spectral Data File", b"#NPOINTS : 5",
                                 b"#XPERCHAN : 0.5", b"#OFFSET : 630", b"#SPECTRUM :",
                                 b"1, 2", b"3", b"#ENDOFDATA :", b"nan, inf", b"\xff\xfe"]),
                max_size=12).map(b"\n".join)
_any_bytes = st.one_of(st.binary(max_size=400), _numbers, _msa)


def _clean(read, path):
    """The reader returns a valid result or raises ValueError (SmartbeamInputError is
    one); anything else escapes as a test failure."""
    try:
        return read(path)
    except ValueError:
        return None


@FUZZ
@given(data=_any_bytes, suffix=st.sampled_from([".txt", ".csv", ".msa", ".dat"]))
def test_spectrum_reader_fuzz(tmp_path_factory, data, suffix):
    path = tmp_path_factory.mktemp("fuzz") / f"s{suffix}"
    path.write_bytes(data)
    out = _clean(read_spectrum, path)
    if out is not None:
        e, y = out
        assert e.ndim == 1 and e.shape == y.shape and len(e) >= 1  # the documented contract
        assert np.all(np.isfinite(e)) and np.all(np.isfinite(y)) and np.all(np.diff(e) > 0)


@FUZZ
@given(data=st.one_of(st.binary(max_size=600), _numbers))
def test_nist_reader_fuzz(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "f.SA3_SRK_S101"
    path.write_bytes(data)
    out = _clean(read_nist_sans, path)
    if out is not None:
        assert np.asarray(out.counts).shape == (128, 128)


# -- plan arguments through the RunEngine ---------------------------------------------------

@pytest.fixture(scope="module")
def twins():
    from sim_devices.ophyd_twins.sans import SimSANSDetector
    from sim_devices.ophyd_twins.xmcd import SimXMCDEndstation
    from sim_devices.physics.sans import SANSSample
    from sim_devices.physics.xmcd import XMCDSample, preset

    return (SimXMCDEndstation(XMCDSample(preset("Fe")), rng=np.random.default_rng(0)),
            SimSANSDetector(SANSSample("realistic", shape=(16, 16)),
                            rng=np.random.default_rng(0)))


@pytest.mark.parametrize("kwargs, match", [
    ({"e_min": 730.0, "e_max": 690.0}, "e_min"),
    ({"e_min": "690", "e_max": 730.0}, "e_min"),
    ({"e_min": float("nan"), "e_max": 730.0}, "e_min"),
    ({"e_min": 690.0, "e_max": 730.0, "dwell": -1.0}, "dwell"),
    ({"e_min": 690.0, "e_max": 730.0, "target": "__import__('os')"}, "target"),
    ({"e_min": 690.0, "e_max": 730.0, "polarisations": ["circ+", "left"]}, "left"),
    ({"e_min": 1.0, "e_max": 1e6}, "limits"),
])
def test_xmcd_plan_arguments_refused_through_the_run_engine(twins, kwargs, match):
    from smartbeam.errors import SmartbeamInputError
    from smartbeam.plans.xmcd import xmcd_adaptive_scan

    RE = RunEngine({})
    docs = []
    RE.subscribe(lambda n, d: docs.append(n))
    with pytest.raises(SmartbeamInputError, match=match):
        RE(xmcd_adaptive_scan(twins[0], **kwargs))
    assert "start" not in docs  # refused before a run opened: nothing half-written


@pytest.mark.parametrize("kwargs, match", [
    ({"exposure": 0.0}, "exposure"), ({"max_exposures": 0}, "max_exposures"),
    ({"product": "os.system('true')"}, "product"), ({"beam_centre": ["a", 1]}, "beam_centre"),
])
def test_sans_plan_arguments_refused(twins, kwargs, match):
    from smartbeam.errors import SmartbeamInputError
    from smartbeam.plans.sans import sans_kde_count

    with pytest.raises(SmartbeamInputError, match=match):
        RunEngine({})(sans_kde_count(twins[1], **kwargs))


def test_no_plan_argument_is_evaluated_as_code(twins, tmp_path, monkeypatch):
    """Strings that would act if passed to eval/exec are refused as values, never run."""
    import builtins

    from smartbeam.errors import SmartbeamInputError
    from smartbeam.plans.sans import sans_kde_count
    from smartbeam.plans.xmcd import xmcd_adaptive_scan

    marker = tmp_path / "pwned"
    payload = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    calls = []
    for name in ("eval", "exec"):
        real = getattr(builtins, name)
        monkeypatch.setattr(builtins, name,
                            lambda *a, _r=real, _n=name, **k: (calls.append(_n), _r(*a, **k))[1])
    RE = RunEngine({})
    for plan in (lambda: xmcd_adaptive_scan(twins[0], 690.0, 730.0, target=payload),
                 lambda: xmcd_adaptive_scan(twins[0], 690.0, 730.0, strategy=payload),
                 lambda: sans_kde_count(twins[1], product=payload),
                 lambda: xmcd_adaptive_scan(twins[0], payload, 730.0)):
        with pytest.raises(SmartbeamInputError):
            RE(plan())
    assert not marker.exists() and calls == []


# -- CLI -----------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["estimate", "/nonexistent/spectrum.txt"],
    ["runs", "--limit", "notanumber"],
    ["bench", "nosuchbench"],
    ["nosuchcommand"],
    ["ioc", "nosuchinstrument"],
])
def test_cli_bad_arguments_exit_nonzero_without_traceback(argv):
    proc = subprocess.run([sys.executable, "-m", "smartbeam.cli", *argv], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and proc.stderr.strip()


def test_replay_cli_bad_directory(tmp_path, capsys):
    import argparse

    from smartbeam.commands import replay
    from smartbeam.errors import SmartbeamInputError

    parser = argparse.ArgumentParser(prog="smartbeam")
    replay.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["replay", str(tmp_path / "missing"), "--data-dir",
                              str(tmp_path / "d")])
    with pytest.raises(SmartbeamInputError, match="does not exist"):
        args.func(args)
