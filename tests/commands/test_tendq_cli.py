"""CLI: smartbeam estimate / library / mds sub-commands, built from register()."""

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from smartbeam.commands import estimate, library
from smartbeam.errors import SmartbeamInputError
from smartbeam.library_store import load_packaged_library

# shared/data sits beside the clone (<repo>/../shared/data); only the development frames and spectra.
DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
EELS = str(DATA / "eels_hyperspy" / "hyperspy_Mn_O_coreloss_spectrum.msa")
needs_eels = pytest.mark.skipif(not Path(EELS).is_file(),
                                reason=f"measured EELS spectrum not found at {EELS}")


def _parser(module):
    p = argparse.ArgumentParser()
    sub = p.add_subparsers()
    module.register(sub)
    return p


@needs_eels
def test_estimate_emsa_rejected_json(capsys):
    args = _parser(estimate).parse_args(["estimate", EELS, "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["file"] == EELS and out["described"] is False and out["ten_dq_eV"] is None
    assert set(out) >= {"sd_eV", "offset_eV", "measure", "per_measure", "flags", "score"}


def test_estimate_two_files_list(tmp_path, capsys):
    lib = load_packaged_library()
    paths = []
    for k in (8, 15):
        p = tmp_path / f"s{k}.csv"
        p.write_text("\n".join(f"{e},{y}" for e, y in zip(lib.energy, lib.spectra[k],
                                                          strict=True)))
        paths.append(str(p))
    args = _parser(estimate).parse_args(["estimate", *paths, "--measure", "pearson", "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert isinstance(out, list) and len(out) == 2
    assert out[0]["measure"] == "pearson"
    assert out[0]["ten_dq_eV"] == pytest.approx(lib.ten_dq[8], abs=0.03)
    assert out[1]["ten_dq_eV"] == pytest.approx(lib.ten_dq[15], abs=0.03)


def test_estimate_bad_file_raises_input_error(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_text("640 1\n639 2\n")
    args = _parser(estimate).parse_args(["estimate", str(p)])
    with pytest.raises(SmartbeamInputError, match="line 2"):
        args.func(args)


def test_library_list_and_build_cached(tmp_path, capsys):
    args = _parser(library).parse_args(["library", "list", "--json",
                                        "--cache-dir", str(tmp_path)])
    assert args.func(args) == 0
    libs = json.loads(capsys.readouterr().out)
    assert libs[0]["location"] == "package" and libs[0]["params"]["ion"] == "Mn2+"
    args = _parser(library).parse_args(["library", "build", "--ion", "Ni2+", "--min", "1",
                                        "--max", "1.2", "--step", "0.2", "--align-dq", "1",
                                        "--jobs", "1", "--cache-dir", str(tmp_path), "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["entries"] == 2 and out["library_id"].startswith("Ni2p-")
    assert (tmp_path / f"{out['library_id']}.npz").exists()
    with pytest.raises(SmartbeamInputError, match="ion"):
        a = _parser(library).parse_args(["library", "build", "--ion", "Xx9+"])
        a.func(a)
    assert np.isfinite(out["entries"])


@needs_eels
def test_mds_command_writes_png(tmp_path, capsys):
    from smartbeam.commands import mds

    out = tmp_path / "map.png"
    args = _parser(mds).parse_args(["mds", EELS, "-o", str(out)])
    assert args.func(args) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SmartbeamInputError, match="png"):
        a = _parser(mds).parse_args(["mds", EELS, "-o", str(tmp_path / "map.txt")])
        a.func(a)
