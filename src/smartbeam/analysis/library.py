"""Multiplet libraries of L2,3 absorption spectra of a 3d^n ion in octahedral symmetry vs 10Dq.

The spectra are computed with edrixs (atomic multiplets, one valence d shell plus one core
p shell). The crystal field is a one-body term, so the many-body Hamiltonians are
``H(10Dq) = H0 + 10Dq * H_cf``: ``H0``, ``H_cf`` and the dipole operators are built once and
each grid value costs one diagonalisation of the initial and of the core-hole Hamiltonian,
done block by block (the Hamiltonians conserve total J_z mod 4). The many-body matrices are
assembled by a vectorised Fock-space builder; edrixs supplies the atomic data and the one-
and two-body coefficients.

Computing is pure (no file I/O); the on-disk cache lives in :mod:`smartbeam.library_store`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import scipy.linalg
from scipy.ndimage import gaussian_filter1d
from threadpoolctl import threadpool_limits

from ..errors import SmartbeamInputError

__all__ = [
    "LIBRARY_SCHEMA",
    "POOL_MIN_ENTRIES",
    "LibraryParams",
    "SpectrumLibrary",
    "Operators",
    "parse_ion",
    "fock_states",
    "fock_operator",
    "invariant_blocks",
    "block_eigh",
    "build_operators",
    "stick_spectrum",
    "broaden_sticks",
    "compute_library",
    "spin_segments",
    "library_with",
]

#: Bumped whenever the computation changes, so cached libraries are recomputed.
LIBRARY_SCHEMA = 1

_K_B_EV = 8.617333262e-5
_ELEMENTS = {"Sc": 21, "Ti": 22, "V": 23, "Cr": 24, "Mn": 25, "Fe": 26, "Co": 27, "Ni": 28,
             "Cu": 29}
# L3 maximum of the align_ten_dq entry; MnO's L3 maximum sits at 640.0 eV. Other ions use
# the tabulated edrixs L3 edge energy unless the caller gives one.
_DEFAULT_ALIGN = {"Mn2+": 640.0}
# Fock states are int64 bit patterns; 1 << 63 would overflow.
_MAX_ORBITALS = 62


def parse_ion(ion: str) -> tuple[str, int, int]:
    """Split an ion label such as ``"Mn2+"`` into element, charge and d-electron count.

    Parameters
    ----------
    ion
        ``<Element><charge>+`` for a 3d transition metal, e.g. ``"Ni2+"``, ``"Fe3+"``.

    Returns
    -------
    element, charge, n_d
    """
    m = re.fullmatch(r"\s*([A-Z][a-z]?)(\d)\+\s*", str(ion))
    if not m or m.group(1) not in _ELEMENTS:
        raise SmartbeamInputError(
            f"ion {ion!r} not understood: expected a 3d transition-metal ion such as "
            f"'Mn2+', 'Ni2+', 'Co2+', 'Fe2+', 'Fe3+' (elements {sorted(_ELEMENTS)})")
    element, charge = m.group(1), int(m.group(2))
    n_d = _ELEMENTS[element] - 18 - charge
    if not 1 <= n_d <= 9:
        raise SmartbeamInputError(
            f"ion {ion!r} has {n_d} d electrons: expected 1..9 for an L2,3 multiplet library")
    return element, charge, n_d


@dataclass(frozen=True)
class LibraryParams:
    """Every parameter a library depends on (its hash is the cache key and library id).

    Parameters
    ----------
    ion
        3d ion, e.g. ``"Mn2+"``.
    ten_dq_min, ten_dq_max, ten_dq_step
        The 10Dq grid in eV (inclusive of both ends).
    slater_scale
        Factor applied to the Hartree-Fock Slater integrals (atomic screening), ~0.8.
    gamma_l3, gamma_l2
        Lorentzian half widths (eV) of the L3 and L2 lines (core-hole lifetime).
    gaussian_fwhm
        Gaussian full width (eV): instrumental resolution.
    temperature
        Kelvin; Boltzmann weights of the initial states.
    align_energy
        Energy (eV) of the L3 maximum of the ``align_ten_dq`` spectrum; ``None``: 640.0 eV for
        Mn2+, the edrixs L3 edge energy otherwise. One global shift for the whole library,
        so 10Dq-dependent peak positions are kept.
    align_ten_dq
        10Dq (eV) of the spectrum used for the alignment.
    energy_step
        Step (eV) of the library energy grid.
    below_l3, above_l2
        Extent (eV) of the energy window below the L3 maximum and above the L2 line.
    """

    ion: str = "Mn2+"
    ten_dq_min: float = 0.0
    ten_dq_max: float = 3.0
    ten_dq_step: float = 0.1
    slater_scale: float = 0.8
    gamma_l3: float = 0.2
    gamma_l2: float = 0.4
    gaussian_fwhm: float = 0.3
    temperature: float = 300.0
    align_energy: float | None = None
    align_ten_dq: float = 0.9
    energy_step: float = 0.05
    below_l3: float = 10.0
    above_l2: float = 12.0

    def __post_init__(self) -> None:
        parse_ion(self.ion)
        checks = {
            "ten_dq_step": self.ten_dq_step > 0,
            "ten_dq_max": self.ten_dq_max >= self.ten_dq_min,
            "ten_dq_min": self.ten_dq_min >= 0,
            "slater_scale": 0 < self.slater_scale <= 1.5,
            "gamma_l3": self.gamma_l3 > 0,
            "gamma_l2": self.gamma_l2 > 0,
            "gaussian_fwhm": self.gaussian_fwhm >= 0,
            "temperature": self.temperature >= 0,
            "energy_step": 0 < self.energy_step <= 0.5,
            "below_l3": self.below_l3 > 0,
            "above_l2": self.above_l2 > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise SmartbeamInputError(
                    f"library parameter {name}={getattr(self, name)!r} is invalid: expected "
                    "positive widths/steps, 0 <= ten_dq_min <= ten_dq_max, "
                    "0 < slater_scale <= 1.5, temperature >= 0, energy_step <= 0.5")

    @property
    def ten_dq_grid(self) -> np.ndarray:
        """The 10Dq values of the library (eV)."""
        n = int(round((self.ten_dq_max - self.ten_dq_min) / self.ten_dq_step)) + 1
        return np.round(self.ten_dq_min + self.ten_dq_step * np.arange(n), 10)

    def resolved_align_energy(self, atom_l3_edge: float) -> float:
        """The alignment energy, falling back to the ion default or the atomic L3 edge."""
        if self.align_energy is not None:
            return float(self.align_energy)
        return float(_DEFAULT_ALIGN.get(self.ion.strip(), atom_l3_edge))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return asdict(self)

    def library_id(self) -> str:
        """Hash of every parameter plus the code schema and edrixs version."""
        payload = json.dumps({"params": self.to_dict(), "schema": LIBRARY_SCHEMA,
                              "edrixs": _edrixs_version()}, sort_keys=True)
        digest = hashlib.sha256(payload.encode()).hexdigest()[:16]
        return f"{self.ion.strip().replace('+', 'p')}-{digest}"


@functools.cache  # package metadata is read from disk: once per process
def _edrixs_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edrixs")
    except PackageNotFoundError:  # pragma: no cover
        return "unknown"


@dataclass
class SpectrumLibrary:
    """A computed library: one broadened spectrum per 10Dq on a common energy grid.

    Attributes
    ----------
    ten_dq
        (n_entries,) 10Dq values in eV.
    energy
        (n_energy,) uniform energy grid in eV.
    spectra
        (n_entries, n_energy) isotropic absorption, edrixs units.
    spin
        (n_entries,) ground-state spin S from <S^2> = S(S+1).
    params
        The :class:`LibraryParams` used.
    segment
        (n_entries,) integer label of the spin branch; it changes at a high->low spin
        crossover. Interpolation between entries is only valid inside one segment.
    meta
        Extra facts (alignment shift, edrixs version, build time ...).
    """

    ten_dq: np.ndarray
    energy: np.ndarray
    spectra: np.ndarray
    spin: np.ndarray
    params: LibraryParams
    segment: np.ndarray = field(default=None)  # type: ignore[assignment]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ten_dq = np.asarray(self.ten_dq, dtype=float)
        self.energy = np.asarray(self.energy, dtype=float)
        self.spectra = np.asarray(self.spectra, dtype=float)
        self.spin = np.asarray(self.spin, dtype=float)
        if self.segment is None:
            self.segment = spin_segments(self.spin)
        self.segment = np.asarray(self.segment, dtype=int)

    @property
    def library_id(self) -> str:
        """Identifier of the library (hash of its parameters)."""
        return self.params.library_id()

    @property
    def crossovers(self) -> list[float]:
        """10Dq midpoints where the ground-state spin changes (eV)."""
        idx = np.flatnonzero(np.diff(self.segment) != 0)
        return [float(0.5 * (self.ten_dq[i] + self.ten_dq[i + 1])) for i in idx]


def spin_segments(spin: np.ndarray, tol: float = 0.25) -> np.ndarray:
    """Label contiguous runs of equal ground-state spin (a change > ``tol`` starts a new run)."""
    spin = np.asarray(spin, dtype=float)
    if spin.size == 0:
        return np.zeros(0, dtype=int)
    return np.concatenate([[0], np.cumsum(np.abs(np.diff(spin)) > tol)]).astype(int)


@dataclass
class Operators:
    """Many-body operators of one ion, built once per library.

    ``h0_i``/``hcf_i`` act on the initial (d^n, full core) space, ``h0_n``/``hcf_n`` on the
    core-hole (d^{n+1}, p^5) space, ``trans`` are the three dipole components and ``s2``
    is the total spin squared in the initial space. ``c_soc`` is the 2p spin-orbit constant.
    ``blocks_i``/``blocks_n`` list the basis indices of the invariant blocks of
    ``h0 + 10Dq * hcf`` (``None``: found at construction); in the octahedral field they are
    the four classes of total J_z mod 4, so each diagonalisation costs ~1/16 of a dense one.
    """

    h0_i: np.ndarray
    hcf_i: np.ndarray
    h0_n: np.ndarray
    hcf_n: np.ndarray
    trans: np.ndarray
    s2: np.ndarray
    c_soc: float
    l3_edge: float
    blocks_i: list[np.ndarray] | None = None
    blocks_n: list[np.ndarray] | None = None

    def __post_init__(self) -> None:
        if self.blocks_i is None:
            self.blocks_i = invariant_blocks(self.h0_i, self.hcf_i)
        if self.blocks_n is None:
            self.blocks_n = invariant_blocks(self.h0_n, self.hcf_n)


def invariant_blocks(*mats: np.ndarray) -> list[np.ndarray]:
    """Index sets of the blocks that every matrix in ``mats`` leaves invariant.

    The blocks are the connected components of the pattern of exactly non-zero entries,
    so ``sum_k x_k mats[k]`` is block diagonal on them for every ``x`` (no tolerance: the
    decomposition is exact for the stored matrices).

    Parameters
    ----------
    mats
        Square matrices of one shape.

    Returns
    -------
    list of numpy.ndarray
        Sorted basis indices of each block; together they partition ``range(n)``.
    """
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    shapes = {np.shape(m) for m in mats}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2 or len(set(next(iter(shapes)))) != 1:
        raise SmartbeamInputError(
            f"matrices of shapes {sorted(shapes)}: expected square matrices of one shape")
    pattern = np.zeros(next(iter(shapes)), dtype=bool)
    for m in mats:
        pattern |= np.asarray(m) != 0
    n, labels = connected_components(csr_matrix(pattern), directed=False)
    return [np.flatnonzero(labels == k) for k in range(n)]


def block_eigh(h0: np.ndarray, h1: np.ndarray, x: float,
               blocks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of ``h0 + x * h1`` block by block (ascending eigenvalues).

    Parameters
    ----------
    h0, h1
        Hermitian matrices, block diagonal on ``blocks`` (see :func:`invariant_blocks`).
    x
        Coefficient of ``h1``.
    blocks
        Index sets partitioning the basis.

    Returns
    -------
    eigenvalues, eigenvectors
        As ``scipy.linalg.eigh`` returns them: ``(n,)`` and ``(n, n)`` with vectors in the
        columns, zero outside their block.
    """
    n = h0.shape[0]
    vals = np.empty(n)
    vecs = np.zeros((n, n), dtype=np.result_type(h0, h1))
    col = 0
    for idx in blocks:
        sub = np.ix_(idx, idx)
        # Divide and conquer ("evd") needs every eigenvector anyway and is ~3x faster than
        # scipy's default MRRR ("evr") driver here.
        e, v = scipy.linalg.eigh(h0[sub] + x * h1[sub], overwrite_a=True,
                                 check_finite=False, driver="evd")
        vals[col:col + len(idx)] = e
        vecs[idx, col:col + len(idx)] = v
        col += len(idx)
    if col != n:
        raise SmartbeamInputError(f"blocks cover {col} of {n} basis states: expected all")
    order = np.argsort(vals, kind="stable")
    return vals[order], vecs[:, order]


def _real_if_possible(a: np.ndarray) -> np.ndarray:
    # Real symmetric eigh is ~6x faster than complex Hermitian eigh for the same size.
    if np.iscomplexobj(a) and np.abs(a.imag).max(initial=0.0) < 1e-12:
        return np.ascontiguousarray(a.real)
    return a


def fock_states(basis: Any) -> np.ndarray:
    """Integer-encoded Fock states of an edrixs basis, in edrixs' matrix-index order.

    Parameters
    ----------
    basis
        An edrixs ``FockBasisSpec`` (as returned by ``edrixs.models.model_1v1c``) or a
        realised edrixs basis. Orbital ``k`` is bit ``1 << k``.

    Returns
    -------
    numpy.ndarray
        (n_states,) int64 bit patterns; row/column ``m`` of an operator built on this
        basis refers to ``states[m]``.
    """
    from edrixs.fock_basis import build_fock_basis

    b = build_fock_basis(basis, method="combinadic")
    if b.norbs > _MAX_ORBITALS:
        raise SmartbeamInputError(
            f"basis with {b.norbs} spin-orbitals: expected at most {_MAX_ORBITALS} "
            "(states are stored as int64 bit patterns)")
    # A few thousand scalar decodes: negligible next to the operator build.
    return np.fromiter((b.decode(m) for m in range(len(b))), dtype=np.int64, count=len(b))


def _parity_sign(bits: np.ndarray) -> np.ndarray:
    # (-1)**popcount: the fermionic sign of moving past the occupied orbitals in ``bits``.
    return 1 - 2 * (np.bitwise_count(bits) & 1).astype(np.int64)


def _terms(emat: Any, umat: Any, norbs: int, tol: float):
    one = np.empty((0, 2), dtype=np.int64), np.empty(0, dtype=complex)
    two = np.empty((0, 4), dtype=np.int64), np.empty(0, dtype=complex)
    if emat is not None:
        emat = np.asarray(emat)
        if emat.shape != (norbs, norbs):
            raise SmartbeamInputError(
                f"emat has shape {emat.shape}: expected {(norbs, norbs)} for {norbs} orbitals")
        idx = np.nonzero(np.abs(emat) > tol)
        one = np.stack(idx, axis=-1).astype(np.int64), emat[idx].astype(complex)
    if umat is not None:
        umat = np.asarray(umat)
        if umat.shape != (norbs,) * 4:
            raise SmartbeamInputError(
                f"umat has shape {umat.shape}: expected {(norbs,) * 4} for {norbs} orbitals")
        idx = np.nonzero(np.abs(umat) > tol)
        # c†_a c†_b c_c c_d with a == b or c == d vanishes (edrixs skips these too).
        keep = (idx[0] != idx[1]) & (idx[2] != idx[3])
        idx = tuple(i[keep] for i in idx)
        two = np.stack(idx, axis=-1).astype(np.int64), umat[idx].astype(complex)
    return one, two


def fock_operator(emat: Any, umat: Any, left: np.ndarray, right: np.ndarray | None = None,
                  *, tol: float = 1e-10, chunk: int = 256) -> np.ndarray:
    """Dense many-body matrix of a one- plus two-body operator in a Fock basis (vectorised).

    ``O = sum_ij emat[i, j] c†_i c_j + sum_abcd umat[a, b, c, d] c†_a c†_b c_c c_d``, the
    convention of ``edrixs.build_op``; the result equals
    ``edrixs.build_op(emat, umat, lb, rb, backend="dense")`` (to rounding). Each term is
    applied to every basis state at once with integer bit operations, instead of edrixs'
    pure-Python loop over states x terms (its numba path compiles for 20-30 s per process).

    Parameters
    ----------
    emat
        (n_orb, n_orb) one-body coefficients, or ``None``.
    umat
        (n_orb,)*4 two-body coefficients, or ``None``.
    left
        Bit patterns of the output (row) basis, from :func:`fock_states`.
    right
        Bit patterns of the input (column) basis; ``None``: ``left``.
    tol
        Coefficients with modulus <= ``tol`` are dropped (edrixs' default).
    chunk
        Terms processed together (bounds the temporary arrays to chunk x n_states).

    Returns
    -------
    numpy.ndarray
        (len(left), len(right)) complex matrix.
    """
    left = np.asarray(left, dtype=np.int64)
    right = left if right is None else np.asarray(right, dtype=np.int64)
    if left.ndim != 1 or right.ndim != 1:
        raise SmartbeamInputError(
            f"basis states of shapes {left.shape}, {right.shape}: expected 1-d bit patterns")
    mat = emat if emat is not None else umat
    norbs = np.asarray(mat).shape[0] if mat is not None else 0
    if norbs > _MAX_ORBITALS:
        raise SmartbeamInputError(
            f"{norbs} spin-orbitals: expected at most {_MAX_ORBITALS} (int64 bit patterns)")
    (t1, v1), (t2, v2) = _terms(emat, umat, norbs, tol)
    order = np.argsort(left, kind="stable")
    sorted_left = left[order]
    rows, cols, vals = [], [], []

    def apply(ops: np.ndarray, coef: np.ndarray) -> None:
        # ops: (n_terms, n_ops) orbitals acted on right to left, with True for creators.
        state = np.broadcast_to(right, (len(coef), len(right)))
        ok = np.ones(state.shape, dtype=bool)
        sign = np.ones(state.shape, dtype=np.int64)
        for orb, create in ops:
            bit = (np.int64(1) << orb)[:, None]
            occupied = (state & bit) != 0
            ok &= ~occupied if create else occupied
            sign = sign * _parity_sign(state & (bit - 1))
            state = state ^ bit  # flips the bit; only kept where ``ok``
        pos = np.minimum(np.searchsorted(sorted_left, state), len(left) - 1)
        ok &= sorted_left[pos] == state
        t, c = np.nonzero(ok)
        rows.append(order[pos[t, c]])
        cols.append(c)
        vals.append(coef[t] * sign[t, c])

    for start in range(0, len(v1), chunk):
        t, v = t1[start:start + chunk], v1[start:start + chunk]
        apply([(t[:, 1], False), (t[:, 0], True)], v)
    for start in range(0, len(v2), chunk):
        t, v = t2[start:start + chunk], v2[start:start + chunk]
        apply([(t[:, 3], False), (t[:, 2], False), (t[:, 1], True), (t[:, 0], True)], v)
    out = np.zeros((len(left), len(right)), dtype=complex)
    if rows:
        np.add.at(out, (np.concatenate(rows), np.concatenate(cols)), np.concatenate(vals))
    return out


def build_operators(ion: str = "Mn2+", slater_scale: float = 0.8) -> Operators:
    """Build H0, H_cf, the dipole operators and S^2 for ``ion`` (done once).

    edrixs supplies the atomic data and the one-/two-body coefficient matrices; the
    many-body matrices are assembled by :func:`fock_operator`.

    Parameters
    ----------
    ion
        3d ion label, e.g. ``"Mn2+"``.
    slater_scale
        Factor on the Hartree-Fock Slater integrals.
    """
    import edrixs  # heavy import kept out of module import (and out of worker start-up)

    element, _, n_d = parse_ion(ion)
    atom = edrixs.get_atom_data(element, "3d", n_d, edge="L23")
    s_i = [v * slater_scale for _, v in atom["slater_i"]]
    s_n = [v * slater_scale for _, v in atom["slater_n"]]
    emat_i, umat_i, basis_i, emat_n, umat_n, basis_n, trans_mat, _ = edrixs.models.model_1v1c(
        ("d", "p"), v_noccu=n_d, slater=(s_i, s_n),
        v_soc=(atom["v_soc_i"][0], atom["v_soc_n"][0]), c_soc=atom["c_soc"])
    ntot = emat_i.shape[0]

    states = {id(b): fock_states(b) for b in (basis_i, basis_n)}

    def op(emat, umat, lb, rb=None):
        # Vectorised replacement of edrixs.solvers.build_op(..., backend="dense"): same
        # matrix, ~60x faster than its pure-Python loops for H0_n (tested against it).
        return fock_operator(emat, umat, states[id(lb)],
                             None if rb is None else states[id(rb)])

    cf = np.zeros((ntot, ntot), dtype=complex)
    cf[:10, :10] = edrixs.cf_cubic_d(1.0)
    spin_ops = []
    for get in (edrixs.get_sx, edrixs.get_sy, edrixs.get_sz):
        m = np.zeros((ntot, ntot), dtype=complex)
        m[:10, :10] = get(2)
        spin_ops.append(op(m, None, basis_i))
    s2 = sum(s @ s for s in spin_ops)
    return Operators(
        h0_i=_real_if_possible(op(emat_i, umat_i, basis_i)),
        hcf_i=_real_if_possible(op(cf, None, basis_i)),
        h0_n=_real_if_possible(op(emat_n, umat_n, basis_n)),
        hcf_n=_real_if_possible(op(cf, None, basis_n)),
        trans=np.stack([op(c, None, basis_n, basis_i) for c in trans_mat]),
        s2=s2,
        c_soc=float(atom["c_soc"]),
        l3_edge=float(atom["edge_ene"][1]),
    )


def stick_spectrum(ops: Operators, ten_dq: float, temperature: float = 300.0,
                   min_weight: float = 1e-7) -> tuple[np.ndarray, np.ndarray, float]:
    """Transition energies and isotropic weights at one 10Dq (one diagonalisation each).

    Parameters
    ----------
    ops
        Operators from :func:`build_operators`.
    ten_dq
        Crystal-field splitting in eV.
    temperature
        Kelvin; 0 means the (possibly degenerate) ground multiplet only.
    min_weight
        Initial states with Boltzmann weight below this are skipped.

    Returns
    -------
    energies, weights, spin
        Stick energies E_n - E_i (eV, edrixs reference), their weights (isotropic average
        of |<n|T_k|i>|^2, Boltzmann weighted) and the ground-state spin S.
    """
    e_i, v_i = block_eigh(ops.h0_i, ops.hcf_i, ten_dq, ops.blocks_i)
    e_n, v_n = block_eigh(ops.h0_n, ops.hcf_n, ten_dq, ops.blocks_n)
    de = e_i - e_i[0]
    if temperature > 0:
        prob = np.exp(-de / (_K_B_EV * temperature))
    else:
        prob = (de < 1e-6).astype(float)
    prob /= prob.sum()
    keep = prob > min_weight
    prob, e_i, v_i_k = prob[keep], e_i[keep], v_i[:, keep]
    # <n|T_k|i> for the kept initial states: (3, n_n, n_kept)
    amp = np.conj(v_n).T @ (ops.trans @ v_i_k)
    weights = (np.abs(amp) ** 2).sum(axis=0) / 3.0 * prob[None, :]
    energies = e_n[:, None] - e_i[None, :]
    ground = de[keep] < 1e-4
    s2 = np.real(np.einsum("ai,ab,bi->i", v_i_k[:, ground].conj(), ops.s2, v_i_k[:, ground]))
    spin = 0.5 * (-1.0 + math.sqrt(1.0 + 4.0 * max(float(s2.mean()), 0.0)))
    w = weights.ravel()
    sel = w > w.max() * 1e-9
    return energies.ravel()[sel], w[sel], spin


def broaden_sticks(energies: np.ndarray, weights: np.ndarray, grid: np.ndarray, *,
                   gamma_l3: float, gamma_l2: float, split: float,
                   gaussian_fwhm: float) -> np.ndarray:
    """Lorentzian (L3/L2 widths) then Gaussian broadening of sticks on a uniform grid.

    Parameters
    ----------
    energies, weights
        Stick positions and weights.
    grid
        Uniform energy grid (same reference as ``energies``).
    gamma_l3, gamma_l2
        Lorentzian half widths below / above ``split``.
    split
        Energy separating L3 from L2 sticks.
    gaussian_fwhm
        Gaussian full width at half maximum (0: none).
    """
    gamma = np.where(energies < split, gamma_l3, gamma_l2)
    # Sum of Lorentzians, normalised to unit area each (as edrixs does).
    diff = grid[:, None] - energies[None, :]
    spec = (weights * gamma / np.pi / (diff ** 2 + gamma ** 2)).sum(axis=1)
    if gaussian_fwhm > 0:
        step = float(grid[1] - grid[0])
        sigma = gaussian_fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0))) / step
        spec = gaussian_filter1d(spec, sigma, mode="nearest")
    return spec


# --- library assembly ---------------------------------------------------------------------
_WORKER_OPS: Operators | None = None


def _init_worker(ops: Operators) -> None:
    global _WORKER_OPS
    _WORKER_OPS = ops
    threadpool_limits(1)  # one BLAS thread per process: oversubscription is much slower


def _worker_sticks(ten_dq: float, temperature: float):
    assert _WORKER_OPS is not None
    return stick_spectrum(_WORKER_OPS, ten_dq, temperature)


def _l3_max(grid: np.ndarray, spec: np.ndarray, split: float) -> float:
    mask = grid < split
    i = int(np.argmax(np.where(mask, spec, -np.inf)))
    if 0 < i < len(grid) - 1:  # parabolic refinement of the peak position
        y0, y1, y2 = spec[i - 1:i + 2]
        den = y0 - 2 * y1 + y2
        if den < 0:
            return float(grid[i] + 0.5 * (y0 - y2) / den * (grid[1] - grid[0]))
    return float(grid[i])


#: Smallest grid that ``compute_library(n_jobs=None)`` spreads across processes.
POOL_MIN_ENTRIES = 64


def compute_library(params: LibraryParams | None = None, *, n_jobs: int | None = None,
                    progress: bool = True, ops: Operators | None = None) -> SpectrumLibrary:
    """Compute the library for ``params`` (fast path, spread across processes).

    Parameters
    ----------
    params
        Library parameters (default: Mn2+, 0-3 eV, 0.1 eV step).
    n_jobs
        Worker processes (1: in this process; ``None``: all cores for grids of at least
        :data:`POOL_MIN_ENTRIES` entries, else in this process). Each uses one BLAS thread.
    progress
        Show a tqdm progress bar on stderr.
    ops
        Pre-built operators (must match ``params.ion``/``slater_scale``).

    Returns
    -------
    SpectrumLibrary
    """
    import time

    from tqdm import tqdm

    params = params or LibraryParams()
    t0 = time.perf_counter()
    with threadpool_limits(1):
        ops = ops or build_operators(params.ion, params.slater_scale)
    grid_dq = params.ten_dq_grid
    if n_jobs is None:
        # Starting spawned workers and sending them the operators (~40 MB for Mn2+) costs
        # ~1.5 s: measured, a 31-entry library took 4.7 s in process and 7.7 s on 2 workers.
        n_jobs = (os.cpu_count() or 1) if len(grid_dq) >= POOL_MIN_ENTRIES else 1
    n_jobs = max(1, int(n_jobs))
    n_jobs = min(n_jobs, len(grid_dq))
    values = list(grid_dq)
    if not np.any(np.isclose(grid_dq, params.align_ten_dq)):
        values.append(params.align_ten_dq)
    results: list[Any]
    bar = tqdm(total=len(values), desc=f"library {params.ion}", unit="spectrum",
               disable=not progress, file=None)
    if n_jobs == 1:
        results = []
        with threadpool_limits(1):
            for dq in values:
                results.append(stick_spectrum(ops, float(dq), params.temperature))
                bar.update()
    else:
        import multiprocessing as mp

        # spawn: safe next to threads (Tiled server, RunEngine) in the parent process.
        with ProcessPoolExecutor(n_jobs, mp_context=mp.get_context("spawn"),
                                 initializer=_init_worker, initargs=(ops,)) as pool:
            futures = [pool.submit(_worker_sticks, float(dq), params.temperature)
                       for dq in values]
            results = []
            for fut in futures:
                results.append(fut.result())
                bar.update()
    bar.close()

    # L3/L2 split: for holes the j=3/2 level lies 1.5*zeta below j=1/2 and carries 2/3 of
    # the weight, so the centroid sits zeta/2 above L3; split halfway between L3 and L2.
    ref_e, ref_w, _ = results[int(np.argmin(np.abs(np.asarray(values) - params.align_ten_dq)))]
    cog = float(np.sum(ref_e * ref_w) / np.sum(ref_w))
    split = cog + 0.25 * ops.c_soc
    l3_c, l2_c = cog - 0.5 * ops.c_soc, cog + ops.c_soc
    pad = 5.0 * max(params.gaussian_fwhm, params.gamma_l2, 0.5)
    fine = np.arange(l3_c - params.below_l3 - 5 - pad, l2_c + params.above_l2 + pad,
                     params.energy_step)
    bro = dict(gamma_l3=params.gamma_l3, gamma_l2=params.gamma_l2, split=split,
               gaussian_fwhm=params.gaussian_fwhm)
    ref_spec = broaden_sticks(ref_e, ref_w, fine, **bro)
    l3_ref = _l3_max(fine, ref_spec, split)
    shift = params.resolved_align_energy(ops.l3_edge) - l3_ref
    # Window edges snapped to the step so the grid is reproducible.
    lo = round((l3_ref - params.below_l3 + shift) / params.energy_step) * params.energy_step
    hi = round((l2_c + params.above_l2 + shift) / params.energy_step) * params.energy_step
    energy = np.round(np.arange(lo, hi + 0.5 * params.energy_step, params.energy_step), 8)
    spectra = np.empty((len(grid_dq), len(energy)))
    spin = np.empty(len(grid_dq))
    for k in range(len(grid_dq)):
        e, w, s = results[k]
        spectra[k] = _broaden_padded(e + shift, w, energy, bro, split + shift, pad)
        spin[k] = s
    meta = {"shift_eV": shift, "l3_l2_split_eV": split + shift, "edrixs": _edrixs_version(),
            "schema": LIBRARY_SCHEMA, "build_s": time.perf_counter() - t0, "n_jobs": n_jobs}
    return SpectrumLibrary(ten_dq=grid_dq, energy=energy, spectra=spectra, spin=spin,
                           params=params, meta=meta)


def _broaden_padded(e: np.ndarray, w: np.ndarray, energy: np.ndarray, bro: dict,
                    split: float, pad: float) -> np.ndarray:
    # Broaden on a padded grid so the Gaussian filter sees no artificial edge.
    step = energy[1] - energy[0]
    npad = int(math.ceil(pad / step))
    grid = energy[0] + step * np.arange(-npad, len(energy) + npad)
    spec = broaden_sticks(e, w, grid, **{**bro, "split": split})
    return spec[npad:npad + len(energy)]


def library_with(params: LibraryParams, **changes: Any) -> LibraryParams:
    """A copy of ``params`` with some fields changed (validated)."""
    return replace(params, **changes)
