"""Multiplet library: fast path against plain edrixs, shipped Mn2+ library, parameters."""

import contextlib
import io

import numpy as np
import pytest

from smartbeam.analysis.library import (
    LibraryParams,
    broaden_sticks,
    build_operators,
    compute_library,
    parse_ion,
    spin_segments,
    stick_spectrum,
)
from smartbeam.errors import SmartbeamInputError
from smartbeam.library_store import (
    get_library,
    load_library_file,
    load_packaged_library,
    save_library,
)


def test_parse_ion():
    assert parse_ion("Mn2+") == ("Mn", 2, 5)
    assert parse_ion("Ni2+") == ("Ni", 2, 8)
    assert parse_ion("Fe3+") == ("Fe", 3, 5)
    assert parse_ion("Co2+")[2] == 7
    for bad in ("Mn", "Zn2+", "mn2+", "Cu1+"):
        with pytest.raises(SmartbeamInputError, match="ion"):
            parse_ion(bad)


def test_params_validated_and_hashed():
    with pytest.raises(SmartbeamInputError, match="gamma_l3"):
        LibraryParams(gamma_l3=-1)
    a, b = LibraryParams(), LibraryParams(slater_scale=0.79)
    assert a.library_id() != b.library_id()
    assert a.library_id() == LibraryParams().library_id()
    assert len(a.ten_dq_grid) == 31 and a.ten_dq_grid[-1] == pytest.approx(3.0)


def test_fast_path_equals_plain_edrixs():
    edrixs = pytest.importorskip("edrixs")
    atom = edrixs.get_atom_data("Ni", "3d", 8, edge="L23")
    scale = 0.8
    s_i = [v * scale for _, v in atom["slater_i"]]
    s_n = [v * scale for _, v in atom["slater_n"]]
    dq, gamma = 1.1, 0.3
    with contextlib.redirect_stdout(io.StringIO()):
        e_i, e_n, trans = edrixs.ed_1v1c_py(
            ("d", "p"), v_noccu=8, slater=(s_i, s_n),
            v_soc=(atom["v_soc_i"][0], atom["v_soc_n"][0]), c_soc=atom["c_soc"],
            v_cfmat=edrixs.cf_cubic_d(dq))
        om = np.linspace(e_n[0] - e_i[0] - 5, e_n[-1] - e_i[0] + 5, 400)
        plain = edrixs.xas_1v1c_py(e_i, e_n, trans, om, gamma_c=gamma,
                                   gs_list=list(range(len(e_i))), temperature=300.0)[:, 0]
    ops = build_operators("Ni2+", scale)
    e, w, spin = stick_spectrum(ops, dq, 300.0, min_weight=0.0)
    fast = broaden_sticks(e, w, om, gamma_l3=gamma, gamma_l2=gamma, split=0.0,
                          gaussian_fwhm=0.0)
    np.testing.assert_allclose(fast, plain, rtol=1e-6, atol=1e-9 * plain.max())
    assert spin == pytest.approx(1.0, abs=0.02)  # Ni2+: S = 1


def test_packaged_mn2_library():
    lib = load_packaged_library()
    assert lib.params == LibraryParams()
    assert lib.spectra.shape == (31, len(lib.energy))
    assert np.all(np.isfinite(lib.spectra)) and np.all(lib.spectra >= 0)
    # high spin S=5/2 at small 10Dq, low spin S=1/2 at 3 eV, one crossover between 2.6-2.7
    assert lib.spin[0] == pytest.approx(2.5, abs=0.05)
    assert lib.spin[-1] == pytest.approx(0.5, abs=0.1)
    assert len(lib.crossovers) == 1 and 2.6 < lib.crossovers[0] < 2.7
    # alignment: the L3 maximum of 10Dq = 0.9 eV sits at 640.0 eV
    i = int(np.argmin(np.abs(lib.ten_dq - 0.9)))
    assert lib.energy[np.argmax(lib.spectra[i])] == pytest.approx(640.0, abs=0.05)
    assert get_library(LibraryParams(), compute=False).library_id == lib.library_id


def test_spin_segments():
    assert list(spin_segments(np.array([2.5, 2.49, 2.5, 0.5, 0.5]))) == [0, 0, 0, 1, 1]


def test_compute_small_library_parallel_matches_serial_and_round_trips(tmp_path):
    params = LibraryParams(ion="Ni2+", ten_dq_min=0.5, ten_dq_max=1.5, ten_dq_step=0.5,
                           align_ten_dq=1.0)
    serial = compute_library(params, n_jobs=1, progress=False)
    parallel = compute_library(params, n_jobs=2, progress=False)
    np.testing.assert_allclose(serial.spectra, parallel.spectra, rtol=1e-10)
    assert serial.spectra.shape[0] == 3 and np.all(serial.spin > 0.9)
    path = save_library(serial, tmp_path)
    back = load_library_file(path)
    np.testing.assert_array_equal(back.spectra, serial.spectra)
    assert back.library_id == serial.library_id
    # the cache is keyed by every parameter: found without computing
    assert get_library(params, directory=tmp_path, compute=False).library_id == serial.library_id
    with pytest.raises(SmartbeamInputError, match="not cached"):
        get_library(LibraryParams(ion="Ni2+", ten_dq_step=0.25), directory=tmp_path,
                    compute=False)


def _edrixs_dense(emat, umat, lb, rb=None):
    edrixs = pytest.importorskip("edrixs")
    return edrixs.solvers.build_op(emat, umat, lb, rb, backend="dense", use_numba=False)


def test_fock_operator_equals_edrixs_small_random():
    from edrixs.fock_basis import FockBasisSpec

    from smartbeam.analysis.library import fock_operator, fock_states

    rng = np.random.default_rng(3)
    n = 6
    emat = rng.normal(size=(n, n)) + 1j * rng.normal(size=(n, n))
    umat = rng.normal(size=(n,) * 4) + 1j * rng.normal(size=(n,) * 4)
    umat[np.abs(umat) < 0.3] = 0.0  # some exact zeros, as in real Coulomb tensors
    emat[0, 3] = 1e-11  # below edrixs' tolerance: dropped by both
    left = FockBasisSpec(((4, 2), (2, 1)))
    right = FockBasisSpec(((4, 3), (2, 0)))
    sl, sr = fock_states(left), fock_states(right)
    assert len(set(sl)) == len(sl) == 12
    for args, mine in (((emat, umat, left), fock_operator(emat, umat, sl)),
                       ((emat, None, left), fock_operator(emat, None, sl)),
                       ((None, umat, left), fock_operator(None, umat, sl)),
                       ((emat, umat, left, right), fock_operator(emat, umat, sl, sr))):
        ref = _edrixs_dense(*args)
        assert mine.shape == ref.shape and np.abs(ref).max() > 1
        np.testing.assert_allclose(mine, ref, rtol=0, atol=1e-12)


def test_fock_operator_equals_edrixs_mn2():
    edrixs = pytest.importorskip("edrixs")
    from smartbeam.analysis.library import fock_operator, fock_states

    atom = edrixs.get_atom_data("Mn", "3d", 5, edge="L23")
    s_i = [v * 0.8 for _, v in atom["slater_i"]]
    s_n = [v * 0.8 for _, v in atom["slater_n"]]
    emat_i, umat_i, basis_i, emat_n, umat_n, basis_n, trans, _ = edrixs.models.model_1v1c(
        ("d", "p"), v_noccu=5, slater=(s_i, s_n),
        v_soc=(atom["v_soc_i"][0], atom["v_soc_n"][0]), c_soc=atom["c_soc"])
    st_i, st_n = fock_states(basis_i), fock_states(basis_n)
    cf = np.zeros((16, 16), dtype=complex)
    cf[:10, :10] = edrixs.cf_cubic_d(1.0)
    cases = [((emat_i, umat_i, basis_i), (st_i,)), ((emat_n, umat_n, basis_n), (st_n,)),
             ((cf, None, basis_n), (st_n,)), ((trans[0], None, basis_n, basis_i), (st_n, st_i))]
    refs = []
    for args, states in cases:
        refs.append(_edrixs_dense(*args))
        np.testing.assert_allclose(fock_operator(args[0], args[1], *states), refs[-1],
                                   rtol=0, atol=1e-12)
    ops = build_operators("Mn2+", 0.8)  # the library's operators are these matrices
    for mine, ref in zip((ops.h0_i, ops.h0_n, ops.hcf_n, ops.trans[0]), refs, strict=True):
        np.testing.assert_allclose(mine, ref, rtol=0, atol=1e-12)


def test_fock_operator_bad_input():
    from smartbeam.analysis.library import fock_operator

    with pytest.raises(SmartbeamInputError, match="emat has shape"):
        fock_operator(np.zeros((3, 4)), None, np.array([1, 2]))
    with pytest.raises(SmartbeamInputError, match="umat has shape"):
        fock_operator(np.zeros((3, 3)), np.zeros((3, 3, 3, 2)), np.array([1, 2]))
    with pytest.raises(SmartbeamInputError, match="1-d"):
        fock_operator(np.zeros((3, 3)), None, np.array([[1, 2]]))


def test_block_eigh_matches_dense_eigh():
    from smartbeam.analysis.library import block_eigh, invariant_blocks

    rng = np.random.default_rng(5)
    n, perm = 9, rng.permutation(9)
    h0, h1 = np.zeros((n, n)), np.zeros((n, n))
    for idx in (perm[:4], perm[4:6], perm[6:]):  # three hidden blocks
        for h in (h0, h1):
            a = rng.normal(size=(len(idx), len(idx)))
            h[np.ix_(idx, idx)] = a + a.T
    blocks = invariant_blocks(h0, h1)
    assert sorted(map(len, blocks)) == [2, 3, 4]
    assert sorted(np.concatenate(blocks)) == list(range(n))
    e, v = block_eigh(h0, h1, 0.7, blocks)
    h = h0 + 0.7 * h1
    np.testing.assert_allclose(e, np.linalg.eigvalsh(h), atol=1e-12)
    np.testing.assert_allclose(v @ np.diag(e) @ v.T, h, atol=1e-12)
    np.testing.assert_allclose(v.T @ v, np.eye(n), atol=1e-12)
    with pytest.raises(SmartbeamInputError, match="square"):
        invariant_blocks(np.zeros((2, 3)))
    with pytest.raises(SmartbeamInputError, match="cover"):
        block_eigh(h0, h1, 0.7, blocks[:2])


def test_fresh_mn2_library_equals_packaged():
    # The packaged library was computed with edrixs' own operator builder and dense eigh.
    lib = compute_library(LibraryParams(), n_jobs=1, progress=False)
    ref = load_packaged_library()
    np.testing.assert_array_equal(lib.energy, ref.energy)
    np.testing.assert_allclose(lib.spectra, ref.spectra, rtol=0, atol=1e-8 * ref.spectra.max())
    np.testing.assert_allclose(lib.spin, ref.spin, atol=1e-9)
    assert lib.crossovers == ref.crossovers
