"""``guard sae export`` and ``guard sae encode`` through ``guard.sae.cli.register``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from guard.sae import open_sae
from guard.sae.cli import register
from tests.sae_fixtures import write_gemmascope, write_saelens

D_IN, D_SAE = 32, 128


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="guard")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    code: int = args.func(args)
    return code


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return write_saelens(tmp_path / "src", D_IN, D_SAE, architecture="topk", extra_cfg={"k": 8})


@pytest.fixture
def x_file(tmp_path: Path) -> Path:
    path = tmp_path / "x.npy"
    np.save(path, np.random.default_rng(0).normal(size=(10, D_IN)).astype(np.float32))
    return path


def test_encode_writes_activations_and_reconstruction(
    tmp_path: Path, source: Path, x_file: Path
) -> None:
    acts_file, recon_file = tmp_path / "acts.npy", tmp_path / "recon.npy"
    assert (
        run(
            "sae",
            "encode",
            str(source),
            "--input",
            str(x_file),
            "--output",
            str(acts_file),
            "--recon",
            str(recon_file),
        )
        == 0
    )
    x = np.load(x_file)
    sae = open_sae(source)
    expected = sae.encoder().encode(x)
    np.testing.assert_array_equal(np.load(acts_file), expected)
    np.testing.assert_allclose(np.load(recon_file), sae.decode(expected, x), rtol=1e-6)


def test_encode_selected_features(tmp_path: Path, source: Path, x_file: Path) -> None:
    out = tmp_path / "acts.npy"
    assert (
        run(
            "sae",
            "encode",
            str(source),
            "--input",
            str(x_file),
            "--output",
            str(out),
            "--features",
            "5,1,99",
        )
        == 0
    )
    full = open_sae(source).encoder().encode(np.load(x_file))
    np.testing.assert_allclose(np.load(out), full[:, [5, 1, 99]], atol=1e-6)


def test_export_then_encode_the_artifact(
    tmp_path: Path, source: Path, x_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"7": "refusal"}))
    art = tmp_path / "art"
    assert (
        run(
            "sae",
            "export",
            str(source),
            str(art),
            "--dtype",
            "int8",
            "--labels",
            str(labels),
            "--sample",
            str(x_file),
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "accuracy of int8 vs fp32 ONNX encoder on 10 rows" in captured.err
    assert "on/off flips" in captured.err
    assert json.loads((art / "manifest.json").read_text())["weight_dtype"] == "int8"
    out = tmp_path / "acts.npy"
    assert run("sae", "encode", str(art), "--input", str(x_file), "--output", str(out)) == 0
    assert np.load(out).shape == (10, D_SAE)


def test_errors_are_one_line_and_non_zero(
    tmp_path: Path, source: Path, x_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "a.npy")
    assert (
        run(
            "sae",
            "encode",
            str(source),
            "--input",
            str(x_file),
            "--output",
            out,
            "--sha256",
            "0" * 64,
        )
        == 1
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "sha256 expected" in err
    assert run("sae", "encode", str(tmp_path), "--input", str(x_file), "--output", out) == 1
    assert "not a recognised SAE" in capsys.readouterr().err
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((2, D_IN + 3), np.float32))
    assert run("sae", "encode", str(source), "--input", str(wrong), "--output", out) == 1
    assert f"d_in={D_IN}" in capsys.readouterr().err
    assert (
        run(
            "sae",
            "encode",
            str(source),
            "--input",
            str(x_file),
            "--output",
            out,
            "--features",
            "1,x",
        )
        == 1
    )
    assert (
        run(
            "sae",
            "encode",
            str(source),
            "--input",
            str(x_file),
            "--output",
            out,
            "--features",
            "1",
            "--recon",
            out,
        )
        == 1
    )


def test_encode_a_params_npz_outside_gemma_scopes_layout_needs_no_hook(
    tmp_path: Path, x_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    npz = write_gemmascope(tmp_path / "my-sae" / "params.npz", D_IN, D_SAE)
    out = tmp_path / "acts.npy"
    assert run("sae", "encode", str(npz), "--input", str(x_file), "--output", str(out)) == 0
    full = open_sae(npz, hook="blocks.0.hook_resid_post").encoder().encode(np.load(x_file))
    np.testing.assert_allclose(np.load(out), full, atol=1e-6)
    # Serving and export still need one: the error says to pass it.
    assert run("sae", "export", str(npz), str(tmp_path / "art"), "--dtype", "fp32") == 1
    assert "cannot tell the hook from the path" in capsys.readouterr().err


def test_help_texts(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["sae", "--help"], ["sae", "export", "--help"], ["sae", "encode", "--help"]):
        with pytest.raises(SystemExit) as exited:
            run(*argv)
        assert exited.value.code == 0
    text = capsys.readouterr().out
    assert "--dtype {fp32,fp16,int8}" in text and "--recon" in text and "--labels" in text
