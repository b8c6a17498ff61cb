"""Reader of raw NIST NCNR SANS ASCII frames."""

from pathlib import Path

import numpy as np
import pytest

from smartbeam.errors import SmartbeamInputError
from smartbeam.readers.nist_sans import read_nist_sans

# CI runs from a fresh clone with shared/ beside it: <repo>/../shared/data/sans_nist
DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "sans_nist"
needs_data = pytest.mark.skipif(not (DATA / "SILIC009.ASC").is_file(),
                                reason=f"NIST SANS frames not found in {DATA} "
                                       "(expected shared/ beside the repository clone)")


@needs_data
def test_silic009():
    fr = read_nist_sans(DATA / "SILIC009.ASC")
    assert fr.counts.shape == (128, 128)
    assert fr.counts.sum() == 3381127  # README total
    assert fr.beam_centre == pytest.approx((105.8, 63.59))
    assert fr.wavelength_nm == pytest.approx(0.6) and fr.distance_m == pytest.approx(1.33)
    assert fr.count_time_s is None and fr.header["BSTOP(mm)"] == 50.8
    # the beam stop shadow sits at the beam centre in [y, x] order
    cx, cy = (int(round(v)) for v in fr.beam_centre)
    assert fr.counts[cy - 1:cy + 2, cx - 1:cx + 2].mean() < 0.2 * np.median(fr.counts)


@needs_data
def test_feb18012():
    fr = read_nist_sans(DATA / "FEB18012.ASC")
    assert fr.counts.sum() == 190305
    assert fr.count_time_s == 26.0 and fr.pixel_size_mm == 5.08


def _write(tmp_path, body, n=16):
    head = ("FILE: X\nLABEL: test\nMON CNT   LAMBDA(A)   DET_OFF(cm)   DET_DIST(m)   TRANS\n"
            "1e6 6 0 4 1 0.1\nBCENT(X,Y)   A1(mm)\n2.5 2.5 50\n"
            "PIXELS(X)    PIXELS(Y)   PIXELSIZE X (mm)  PIXELSIZE Y (mm)\n4 4 5 5\n"
            "ASCII data created now\n")
    p = tmp_path / "t.ASC"
    p.write_text(head + body)
    return p


def test_bad_files(tmp_path):
    ok = _write(tmp_path, "\n".join(["1"] * 16))
    assert read_nist_sans(ok).counts.shape == (4, 4)
    with pytest.raises(SmartbeamInputError, match=r"t.ASC:13: 'x'"):
        read_nist_sans(_write(tmp_path, "\n".join(["1"] * 3 + ["x"] + ["1"] * 12)))
    with pytest.raises(SmartbeamInputError, match="15 counts.*expected 16"):
        read_nist_sans(_write(tmp_path, "\n".join(["1"] * 15)))
    with pytest.raises(SmartbeamInputError, match=">= 0"):
        read_nist_sans(_write(tmp_path, "\n".join(["-1"] + ["1"] * 15)))
    p = tmp_path / "nohead.ASC"
    p.write_text("1\n2\n")
    with pytest.raises(SmartbeamInputError, match="nohead.ASC.*MON CNT"):
        read_nist_sans(p)
