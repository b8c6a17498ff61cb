"""Fault: the caproto twin IOC dies or freezes mid-scan.

The session's IOC processes are killed (SIGKILL) or frozen (SIGSTOP) for real and brought
back on the same port; an :class:`~smartbeam.faults.IOCSuspender` pauses the plan, names
the PVs, and the scan resumes from its last checkpoint. Every point is in Tiled exactly
once. The IOCs are always left running for later tests.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
from bluesky.plans import count

from smartbeam.faults import IOCSuspender, install_ioc_suspenders


def _kill(proc) -> None:
    os.killpg(proc.process.pid, signal.SIGKILL)
    proc.process.wait(10)


def _ensure_running(proc) -> None:
    if not proc.alive:
        proc.start()
    else:  # a frozen one is thawed
        os.killpg(proc.process.pid, signal.SIGCONT)


@pytest.fixture
def xmcd_ioc(iocs, beamline_devices):
    proc = iocs["xmcd"]
    dev = beamline_devices["xmcd"]
    yield proc, dev
    _ensure_running(proc)
    dev.wait_for_connection(timeout=30)


def _fault_after_event(RE, n: int, fault, restore, down_s: float):
    """Inject ``fault`` (in a thread) when event ``n`` of ``primary`` is emitted, undo it
    with ``restore`` ``down_s`` seconds later."""
    done = threading.Event()
    primary = set()

    def cb(name, doc):
        if name == "descriptor" and doc["name"] == "primary":
            primary.add(doc["uid"])
        if name == "event" and doc["descriptor"] in primary and doc["seq_num"] == n \
                and not done.is_set():
            done.set()

            def inject():
                fault()
                time.sleep(down_s)
                restore()

            threading.Thread(target=inject, daemon=True).start()

    RE.subscribe(cb)
    return done


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", ["kill", "freeze"])
def test_ioc_fault_mid_scan_suspends_and_resumes_without_loss(kind, xmcd_ioc, storage, RE):
    proc, xmcd = xmcd_ioc
    xmcd.dwell.set(0.5).wait(5)  # twin time-scale 0.02: ~10 ms per point
    RE.subscribe(storage.writer(batch_size=5))
    (susp,) = install_ioc_suspenders(RE, [xmcd], period=0.3, timeout=0.5, sleep=0.5)
    if kind == "kill":
        fault, restore = (lambda: _kill(proc)), proc.start
    else:
        pid = proc.process.pid
        fault = lambda: os.killpg(pid, signal.SIGSTOP)  # noqa: E731
        restore = lambda: os.killpg(pid, signal.SIGCONT)  # noqa: E731
    injected = _fault_after_event(RE, 10, fault, restore, down_s=3.0)
    t0 = time.monotonic()
    (uid,) = RE(count([xmcd], num=40, delay=0.05), fault=kind)
    elapsed = time.monotonic() - t0
    RE.remove_suspender(susp)
    assert injected.is_set()
    # the plan really waited for the IOC, and the suspension named the PVs
    assert elapsed > 3.0
    # (on a loaded machine the 0.5 s probe can also time out once: any trip may come first)
    assert susp.trips, "the suspender never tripped"
    assert all(proc.prefix in t for t in susp.trips)
    if kind == "kill":
        assert any("disconnected" in t for t in susp.trips)
    else:
        assert any("did not answer" in t or "disconnected" in t for t in susp.trips)
    run = storage.runs[uid]
    assert run.metadata["stop"]["exit_status"] == "success"
    seq = run["primary"]["seq_num"].read()
    np.testing.assert_array_equal(np.sort(seq), np.arange(1, 41))  # each point once
    tey = run["primary"][xmcd.tey.name].read()
    assert len(tey) == 40 and np.all(np.isfinite(tey))
    # a restarted IOC had lost the dwell: the suspender wrote it back before resuming
    assert float(xmcd.dwell.get()) == pytest.approx(0.5)


def test_suspender_refuses_a_device_without_pvs():
    from ophyd.sim import det

    from smartbeam.errors import SmartbeamInputError

    with pytest.raises(SmartbeamInputError, match="no EPICS signals"):
        IOCSuspender(det)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_adaptive_xmcd_scan_resumes_with_gp_state_after_ioc_kill(xmcd_ioc, storage, RE,
                                                                 monkeypatch):
    """Kill the XMCD twin's IOC in the adaptive phase of ``xmcd_adaptive_scan``, restart
    it: the scan resumes and finishes, the GP was told exactly the stored points, the
    decisions stream goes on, and the moments agree with an undisturbed run."""
    from sim_devices.physics.xmcd import preset
    from smartbeam.analysis.acquisition import AdaptiveXMCD
    from smartbeam.plans import xmcd as xmcd_plans
    from smartbeam.storage import read_stream

    proc, xmcd = xmcd_ioc
    fe = preset("Fe")  # the twin's sample (tests/conftest.py)
    told = []

    class RecordingXMCD(AdaptiveXMCD):
        def tell(self, energy, mu_plus, mu_minus, *args, **kwargs):
            told.append((energy, mu_plus, mu_minus))
            return super().tell(energy, mu_plus, mu_minus, *args, **kwargs)

    monkeypatch.setattr(xmcd_plans, "AdaptiveXMCD", RecordingXMCD)
    RE.subscribe(storage.writer(batch_size=5))
    (susp,) = install_ioc_suspenders(RE, [xmcd], period=0.3, timeout=0.5, sleep=0.5)
    kwargs = dict(edges=[fe.e_l3, fe.e_l2], n_h=fe.n_h, tol=0.05, max_points=30, n_init=12,
                  dwell=1.0)
    (ref_uid,) = RE(xmcd_plans.xmcd_adaptive_scan(xmcd, *fe.window, **kwargs))
    assert not susp.trips
    told.clear()
    # primary event 30: the 3rd energy chosen by the GP (24 events in the initial design)
    injected = _fault_after_event(RE, 30, lambda: _kill(proc), proc.start, down_s=2.0)
    (uid,) = RE(xmcd_plans.xmcd_adaptive_scan(xmcd, *fe.window, **kwargs))
    RE.remove_suspender(susp)
    assert injected.is_set() and any("disconnected" in t for t in susp.trips)

    run = storage.runs[uid]
    assert run.metadata["stop"]["exit_status"] == "success"
    primary = read_stream(run, "primary")
    decisions = read_stream(run, "decisions")
    moments = {k: v[0] for k, v in read_stream(run, "moments").items()}
    n = int(moments["moments_n_points"])
    assert len(told) == n > 15  # the scan went on well past the fault
    # Every stored event once; the GP's points are the stored points: each energy it was
    # told is stored exactly twice (one per helicity) with the same mu+ and mu-.
    seq = run["primary"]["seq_num"].read()
    np.testing.assert_array_equal(np.sort(seq), np.arange(1, 2 * n + 1))
    sp = primary[xmcd.energy.setpoint.name]
    mode = primary[xmcd.pol.mode.name]
    mu = primary[xmcd.tey.name] / primary[xmcd.i0.name]
    for energy, mu_plus, mu_minus in told:
        at = np.flatnonzero(np.abs(sp - energy) < 1e-6)
        assert sorted(mode[at]) == ["circ+", "circ-"], f"{energy} eV stored {len(at)} times"
        stored = dict(zip(mode[at], mu[at], strict=True))
        assert stored["circ+"] == pytest.approx(mu_plus, rel=1e-12)
        assert stored["circ-"] == pytest.approx(mu_minus, rel=1e-12)
    # The decisions stream goes on through the fault: one row per choice, then the stop.
    np.testing.assert_array_equal(decisions["decision_n_points"], np.arange(12, n + 1))
    assert str(decisions["decision_stop_reason"][-1]) != ""
    # Same answer as without the fault, within the two runs' combined posterior sd (x3).
    ref = {k: v[0] for k, v in read_stream(storage.runs[ref_uid], "moments").items()}
    for key in ("m_orb", "m_spin"):
        sd = np.hypot(moments[f"moments_{key}_sd"], ref[f"moments_{key}_sd"])
        assert abs(moments[f"moments_{key}"] - ref[f"moments_{key}"]) < 3 * sd, key


@pytest.mark.slow
def test_ioc_fault_without_checkpoint_fails_naming_pv_and_ioc(xmcd_ioc):
    """A plan that cannot be rewound (``clear_checkpoint``) gets a clear error instead of
    ophyd's ``DisconnectedError`` naming only the signal."""
    import asyncio
    from types import SimpleNamespace

    from bluesky import Msg
    from ophyd.utils.errors import DisconnectedError

    from smartbeam.faults import IOCFaultError, _guarded

    proc, xmcd = xmcd_ioc
    susp = IOCSuspender(xmcd, period=0.3, timeout=0.5)
    fake_re = SimpleNamespace(suspenders=(susp,), resumable=False)
    susp.RE = fake_re

    async def dead_read(msg):
        raise DisconnectedError(f"{msg.obj.name} is not connected")

    guarded = _guarded(fake_re, dead_read)
    with pytest.raises(IOCFaultError) as info:
        asyncio.run(guarded(Msg("read", xmcd.tey)))
    text = str(info.value)
    assert xmcd.tey.pvname in text and proc.prefix in text and "'xmcd'" in text
    assert "no checkpoint" in text and "EPICS_CA_ADDR_LIST" in text
    assert isinstance(info.value.__cause__, DisconnectedError)

    async def limit_error(msg):  # not a connection problem: passes through unchanged
        raise ValueError("outside the limits")

    with pytest.raises(ValueError, match="outside the limits"):
        asyncio.run(_guarded(fake_re, limit_error)(Msg("set", xmcd.energy, 1e6)))
