"""Spectrum readers: EMSA/MSA and two-column text, and clear errors on bad files."""

from pathlib import Path

import numpy as np
import pytest

from smartbeam.errors import SmartbeamInputError
from smartbeam.readers.spectra import read_spectrum

# shared/data sits beside the clone (<repo>/../shared/data); only the development frames and spectra.
DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
EELS = str(DATA / "eels_hyperspy" / "hyperspy_Mn_O_coreloss_spectrum.msa")
needs_eels = pytest.mark.skipif(not Path(EELS).is_file(),
                                reason=f"measured EELS spectrum not found at {EELS}")


@needs_eels
def test_emsa_file():
    e, y = read_spectrum(EELS)
    assert e.size == y.size == 2048
    assert e[0] == pytest.approx(360.0) and e[1] - e[0] == pytest.approx(0.2)
    assert y[0] == 47179 and y[-1] == 12924


def test_two_column_csv_and_text(tmp_path):
    e = np.linspace(630, 660, 31)
    y = np.exp(-((e - 640) ** 2))
    csv = tmp_path / "s.csv"
    csv.write_text("energy,mu\n" + "\n".join(f"{a},{b}" for a, b in zip(e, y, strict=True)))
    txt = tmp_path / "s.txt"
    txt.write_text("# comment\n" + "\n".join(f"{a}\t{b}\t0" for a, b in zip(e, y, strict=True)))
    for p in (csv, txt):
        e2, y2 = read_spectrum(p)
        np.testing.assert_allclose(e2, e)
        np.testing.assert_allclose(y2, y)


def test_msa_xy(tmp_path):
    p = tmp_path / "xy.msa"
    p.write_text("#FORMAT : EMSA/MAS Spectral Data File\n#DATATYPE : XY\n#XUNITS : eV\n"
                 "#SPECTRUM :\n1.0, 5\n2.0, 6\n#ENDOFDATA :\n")
    e, y = read_spectrum(p)
    assert list(e) == [1.0, 2.0] and list(y) == [5.0, 6.0]


@pytest.mark.parametrize("content, match", [
    ("", "no data"),
    ("# only a comment\n", "no data"),
    ("1.0\n2.0\n", "line 1: 1 column; expected two columns"),
    ("1,1\n3,2\n2,3\n", "line 3: energy 2.0 does not increase"),
    ("1,1\n2,nan\n3,2\n", "line 2: non-finite"),
    ("1,1\n2,abc\n", "line 2: 'abc'|line 2: '2,abc' is not numeric"),
])
def test_bad_text_files(tmp_path, content, match):
    p = tmp_path / "bad.txt"
    p.write_text(content)
    with pytest.raises(SmartbeamInputError, match=match) as info:
        read_spectrum(p)
    assert str(p) in str(info.value)


def test_bad_msa_and_missing_file(tmp_path):
    p = tmp_path / "bad.msa"
    p.write_text("#FORMAT : EMSA\n#XUNITS : keV\n#XPERCHAN : 1\n#SPECTRUM :\n1\n2\n")
    with pytest.raises(SmartbeamInputError, match="expected eV"):
        read_spectrum(p)
    with pytest.raises(SmartbeamInputError, match="not found"):
        read_spectrum(tmp_path / "none.msa")


def test_range_missing_the_edge(tmp_path):
    from smartbeam.analysis.tendq import TenDqFitter
    from smartbeam.library_store import load_packaged_library

    p = tmp_path / "o_k.txt"
    e = np.linspace(520, 560, 200)
    p.write_text("\n".join(f"{a} {b}" for a, b in zip(e, np.ones_like(e), strict=True)))
    e2, y2 = read_spectrum(p)
    with pytest.raises(SmartbeamInputError, match="misses the edge"):
        TenDqFitter().fit(load_packaged_library()).predict(e2, y2, name=str(p))
