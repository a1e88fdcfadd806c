"""The encoder runtime: subsets, providers, thread safety, pins, export round trips."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from numpy.typing import NDArray

from guard.errors import ConfigError, InvalidInput, NotFound, SaeFileError
from guard.sae import Encoder, Sae, open_sae
from guard.sae.architectures import StandardSae
from guard.sae.export import export_artifact
from guard.sae.registry import known_architectures, register_architecture
from tests.sae_fixtures import (
    random_gated_weights,
    random_jumprelu_weights,
    random_standard_weights,
    write_gemmascope,
    write_saelens,
    write_sparsify,
)

D_IN, D_SAE, K = 32, 128, 8
FEATURES = [3, 77, 0, 127, 40]


def rows(n: int = 40, seed: int = 1, scale: float = 1.0) -> NDArray[np.float32]:
    return np.random.default_rng(seed).normal(0.0, scale, size=(n, D_IN)).astype(np.float32)


def make_saelens(folder: Path, arch: str, **cfg: Any) -> Path:
    weights = {
        "jumprelu": random_jumprelu_weights,
        "gated": random_gated_weights,
    }.get(arch, random_standard_weights)(D_IN, D_SAE, 2)
    extra = {"k": K, **cfg} if arch == "topk" else cfg
    return write_saelens(folder, D_IN, D_SAE, architecture=arch, extra_cfg=extra, weights=weights)


@pytest.fixture(params=["standard", "topk", "jumprelu", "gated"])
def sae(request: pytest.FixtureRequest, tmp_path: Path) -> Sae:
    return open_sae(make_saelens(tmp_path / request.param, request.param))


def test_subset_equals_columns_of_full(sae: Sae) -> None:
    x = rows()
    full = sae.encoder().encode(x)
    subset = sae.encoder(FEATURES)
    assert subset.feature_ids.tolist() == FEATURES
    np.testing.assert_allclose(subset.encode(x), full[:, FEATURES], rtol=1e-5, atol=2e-5)


def test_all_features_give_the_full_encoder(sae: Sae) -> None:
    full = sae.encoder()
    assert sae.encoder(None) is full
    assert sae.encoder(list(range(D_SAE))) is full
    assert full.feature_ids.tolist() == list(range(D_SAE))
    assert sae.encoder(FEATURES) is sae.encoder(FEATURES)  # built once


def test_subset_graph_holds_only_the_requested_columns(tmp_path: Path) -> None:
    sae = open_sae(make_saelens(tmp_path, "jumprelu"))
    graph = sae.model.encoder_model(np.array(FEATURES), "fp32")
    w_enc = next(t for t in graph.graph.initializer if t.name == "W_enc")
    assert list(w_enc.dims) == [D_IN, len(FEATURES)]


def test_topk_approximation_is_relu_of_the_subset_pre_activations(tmp_path: Path) -> None:
    sae = open_sae(make_saelens(tmp_path, "topk"))
    x = rows()
    full = sae.encoder().encode(x)
    approx = sae.encoder(FEATURES, approximate_topk=True).encode(x)
    pre = (x.astype(np.float64) - 0) @ sae.model.architecture.w_enc + sae.model.architecture.params[
        "b_enc"
    ]
    np.testing.assert_allclose(approx, np.maximum(pre[:, FEATURES], 0), rtol=1e-5, atol=2e-5)
    # Exact wherever TopK kept the feature; never below the exact value.
    kept = full[:, FEATURES] > 0
    np.testing.assert_allclose(approx[kept], full[:, FEATURES][kept], rtol=1e-5, atol=2e-5)
    assert (approx >= full[:, FEATURES] - 2e-5).all()


def test_approximate_flag_does_not_change_exact_architectures(tmp_path: Path) -> None:
    sae = open_sae(make_saelens(tmp_path, "standard"))
    assert sae.encoder(FEATURES, approximate_topk=True) is sae.encoder(FEATURES)


def test_bad_feature_ids(sae: Sae) -> None:
    with pytest.raises(NotFound, match=rf"feature {D_SAE} .*d_sae={D_SAE}"):
        sae.encoder([1, D_SAE])
    with pytest.raises(NotFound, match="feature -1"):
        sae.decoder_directions([-1])
    with pytest.raises(InvalidInput, match="at least one"):
        sae.encoder([])


def test_decoder_directions_are_w_dec_rows(tmp_path: Path) -> None:
    weights = random_standard_weights(D_IN, D_SAE, 2)
    sae = open_sae(make_saelens(tmp_path, "standard"))
    directions = sae.decoder_directions([5, 1])
    assert directions.shape == (2, D_IN) and directions.dtype == np.float32
    np.testing.assert_array_equal(directions, weights["W_dec"][[5, 1]])


def test_encoder_checks_its_input(tmp_path: Path) -> None:
    encoder = open_sae(make_saelens(tmp_path, "standard")).encoder()
    assert encoder.execution_provider == "CPUExecutionProvider"
    with pytest.raises(InvalidInput, match="float32"):
        encoder.encode(rows().astype(np.float64))
    with pytest.raises(InvalidInput, match=rf"\[rows, {D_IN}\]"):
        encoder.encode(np.zeros((3, D_IN + 1), dtype=np.float32))
    with pytest.raises(InvalidInput, match="C-contiguous"):
        encoder.encode(np.asfortranarray(rows()))
    assert encoder.encode(np.zeros((0, D_IN), dtype=np.float32)).shape == (0, D_SAE)


def test_encode_is_thread_safe(tmp_path: Path) -> None:
    sae = open_sae(make_saelens(tmp_path, "topk"))
    encoders: list[Encoder] = [sae.encoder(), sae.encoder(FEATURES)]
    inputs = [rows(n=1 + 7 * i, seed=i) for i in range(8)]
    expected = [[e.encode(x) for x in inputs] for e in encoders]
    failures: list[str] = []

    def worker(t: int) -> None:
        for r in range(30):
            i = (t + r) % len(inputs)
            for e, want in zip(encoders, expected, strict=True):
                if not np.array_equal(e.encode(inputs[i]), want[i]):
                    failures.append(f"thread {t} round {r}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_providers_are_explicit(tmp_path: Path) -> None:
    folder = make_saelens(tmp_path, "standard")
    sae = open_sae(folder, providers=["CPUExecutionProvider"])
    assert sae.encoder().execution_provider == "CPUExecutionProvider"
    with pytest.raises(ConfigError, match="NoSuchExecutionProvider"):
        open_sae(folder, providers=["NoSuchExecutionProvider"])


def test_sha256_pin(tmp_path: Path) -> None:
    folder = make_saelens(tmp_path, "standard")
    import hashlib

    digest = hashlib.sha256((folder / "sae_weights.safetensors").read_bytes()).hexdigest()
    assert open_sae(folder, sha256=digest).info.sha256 == digest
    assert open_sae(folder, sha256=f"sha256:{digest.upper()}").info.sha256 == digest
    wrong = "0" * 64
    with pytest.raises(SaeFileError) as caught:
        open_sae(folder, sha256=wrong)
    message = str(caught.value)
    assert "sae_weights.safetensors" in message and wrong in message and digest in message


def test_registry_rejects_duplicates_and_lists_known() -> None:
    assert known_architectures() == ["gated", "jumprelu", "standard", "topk"]
    with pytest.raises(ValueError, match="'standard' is already registered"):
        register_architecture(StandardSae)


# --- export ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu", "gated"])
def test_fp32_export_round_trip_is_exact(tmp_path: Path, arch: str) -> None:
    source = open_sae(make_saelens(tmp_path / "src", arch))
    report = export_artifact(tmp_path / "src", tmp_path / "out", dtype="fp32", stream=None)
    assert report.max_abs_error < 1e-4 and report.flip_rate == 0.0
    artifact = open_sae(tmp_path / "out")
    assert artifact.info.source_format == "artifact"
    assert artifact.info.sha256 == sha256_of(tmp_path / "out" / "manifest.json")
    assert artifact.info.source_sha256 == source.info.sha256 == source.info.source_sha256
    assert (artifact.info.architecture, artifact.info.d_in, artifact.info.d_sae) == (
        arch,
        D_IN,
        D_SAE,
    )
    x = rows()
    np.testing.assert_allclose(artifact.encoder().encode(x), source.encoder().encode(x), atol=1e-5)
    np.testing.assert_allclose(
        artifact.encoder(FEATURES).encode(x), source.encoder(FEATURES).encode(x), atol=1e-5
    )
    np.testing.assert_array_equal(
        artifact.decoder_directions(FEATURES), source.decoder_directions(FEATURES)
    )


@pytest.mark.parametrize(("dtype", "tolerance"), [("fp16", 0.02), ("int8", 0.08)])
def test_reduced_precision_exports_stay_within_the_reported_error(
    tmp_path: Path, dtype: str, tolerance: float
) -> None:
    # ReLU is continuous, so the error bound holds everywhere (a JumpReLU or TopK flip
    # jumps by a whole activation, which the flip rate reports instead).
    make_saelens(tmp_path / "src", "standard")
    source = open_sae(tmp_path / "src")
    x = rows(n=64, seed=5)
    report = export_artifact(tmp_path / "src", tmp_path / dtype, dtype=dtype, sample=x, stream=None)  # type: ignore[arg-type]
    artifact = open_sae(tmp_path / dtype)
    assert artifact.info.weight_dtype == dtype
    found, reference = artifact.encoder().encode(x), source.encoder().encode(x)
    error = float(np.abs(found - reference).max())
    assert error == pytest.approx(report.max_abs_error, rel=1e-3, abs=1e-6)
    assert 0 < error < tolerance
    assert report.flip_rate < 0.02
    manifest = json.loads((tmp_path / dtype / "manifest.json").read_text())
    assert manifest["accuracy_vs_fp32"]["max_abs_error"] == report.max_abs_error
    assert any(
        n.op_type == "MatMulInteger"
        for n in onnx.load(tmp_path / dtype / "encoder.onnx").graph.node
    ) == (dtype == "int8")


def test_int8_keeps_ordinary_rows_accurate_next_to_a_huge_row(tmp_path: Path) -> None:
    """A BOS-like row 100x the others in the same batch must not flatten the other rows."""
    make_saelens(tmp_path / "src", "standard")
    export_artifact(tmp_path / "src", tmp_path / "int8", dtype="int8", stream=None)
    x = rows(n=32, seed=3)
    x[0] *= 100.0
    reference = open_sae(tmp_path / "src").encoder().encode(x)
    found = open_sae(tmp_path / "int8").encoder().encode(x)
    flips = np.mean((found[1:] > 0) != (reference[1:] > 0))
    assert flips < 0.02


def test_export_writes_manifest_labels_and_progress(tmp_path: Path) -> None:
    folder = write_sparsify(tmp_path / "layers.3", D_IN, D_SAE, k=K)
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"3": "deception", "77": "code with a security hole"}))
    import io

    stream = io.StringIO()
    export_artifact(folder, tmp_path / "art", dtype="fp32", labels=labels, stream=stream)
    assert "accuracy of fp32 vs NumPy fp32 reference" in stream.getvalue()
    pin = sha256_of(tmp_path / "art" / "manifest.json")
    assert f"artifact sha256 {pin} (of manifest.json" in stream.getvalue()
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["hook_name"] == "layers.3"
    assert manifest["source_format"] == "sparsify"
    assert manifest["architecture"] == "topk" and manifest["architecture_config"] == {"k": K}
    assert manifest["feature_labels"] == {"3": "deception", "77": "code with a security hole"}
    sae = open_sae(tmp_path / "art")
    assert dict(sae.info.feature_labels) == {3: "deception", 77: "code with a security hole"}


def test_export_refuses_a_non_empty_output_unless_forced(tmp_path: Path) -> None:
    make_saelens(tmp_path / "src", "standard")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(SaeFileError, match="--force"):
        export_artifact(tmp_path / "src", tmp_path / "out", dtype="fp32", stream=None)
    export_artifact(tmp_path / "src", tmp_path / "out", dtype="fp32", stream=None, force=True)
    assert not (tmp_path / "out" / "keep.txt").exists()


def test_artifact_dtype_can_be_changed_at_open(tmp_path: Path) -> None:
    make_saelens(tmp_path / "src", "gated")
    export_artifact(tmp_path / "src", tmp_path / "art", dtype="int8", stream=None)
    as_fp32 = open_sae(tmp_path / "art", dtype="fp32")
    assert as_fp32.info.weight_dtype == "fp32"
    x = rows()
    np.testing.assert_allclose(
        as_fp32.encoder().encode(x), open_sae(tmp_path / "src").encoder().encode(x), atol=2e-5
    )


def test_changed_artifact_file_is_refused(tmp_path: Path) -> None:
    make_saelens(tmp_path / "src", "standard")
    export_artifact(tmp_path / "src", tmp_path / "art", dtype="fp32", stream=None)
    weights = tmp_path / "art" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(
        SaeFileError, match=r"weights\.safetensors: sha256 expected [0-9a-f]{64} .*found"
    ):
        open_sae(tmp_path / "art")


def test_gemmascope_export_keeps_the_source_sha256_as_lineage(tmp_path: Path) -> None:
    npz = write_gemmascope(
        tmp_path / "gemma-scope-2b-pt-res" / "layer_4" / "params.npz", D_IN, D_SAE
    )
    source = open_sae(npz)
    export_artifact(npz, tmp_path / "art", dtype="fp16", stream=None)
    artifact = open_sae(tmp_path / "art", sha256=sha256_of(tmp_path / "art" / "manifest.json"))
    assert artifact.info.source_sha256 == source.info.sha256
    assert artifact.info.hook_name == "blocks.4.hook_resid_post"
    x = rows()
    np.testing.assert_allclose(
        artifact.encoder(FEATURES).encode(x), source.encoder(FEATURES).encode(x), atol=0.02
    )


# --- artifact integrity and pins --------------------------------------------------------------


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export_two(tmp_path: Path) -> tuple[Path, Path]:
    """Two exported artifacts of different SAEs of the same shape and hook."""
    for name, seed in (("a", 1), ("b", 2)):
        write_saelens(tmp_path / f"src_{name}", D_IN, D_SAE, seed=seed)
        export_artifact(tmp_path / f"src_{name}", tmp_path / name, dtype="fp32", stream=None)
    return tmp_path / "a", tmp_path / "b"


def test_untouched_artifact_loads_with_its_pin(tmp_path: Path) -> None:
    art, _ = export_two(tmp_path)
    pin = sha256_of(art / "manifest.json")
    for written in (pin, f"sha256:{pin.upper()}", f"  {pin}\n"):
        sae = open_sae(art, sha256=written)
        assert sae.info.sha256 == pin
        assert sae.info.source_sha256 == sha256_of(tmp_path / "src_a" / "sae_weights.safetensors")
        assert sae.encoder().encode(rows()).shape == (40, D_SAE)


@pytest.mark.parametrize(
    "swapped",
    [("weights.safetensors",), ("encoder.onnx",), ("weights.safetensors", "encoder.onnx")],
    ids=["weights", "encoder", "both"],
)
def test_swapped_files_with_a_rewritten_manifest_fail_the_pin(
    tmp_path: Path, swapped: tuple[str, ...]
) -> None:
    """The reviewer's attack: another SAE's files, and the manifest's hashes rewritten to
    match them, keeping the recorded source sha256."""
    art, other = export_two(tmp_path)
    pin = sha256_of(art / "manifest.json")
    source_pin = json.loads((art / "manifest.json").read_text())["sha256"]
    manifest = json.loads((art / "manifest.json").read_text())
    for name in swapped:
        shutil.copyfile(other / name, art / name)
        manifest["files"][name] = sha256_of(art / name)
    (art / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

    tampered = sha256_of(art / "manifest.json")
    assert open_sae(art).info.sha256 == tampered != pin  # verifies: a new, different identity
    with pytest.raises(SaeFileError) as caught:
        open_sae(art, sha256=pin)
    message = str(caught.value)
    assert str(art / "manifest.json") in message
    assert f"sha256 expected {pin} (pinned), found {tampered}" in message
    # The recorded source sha256 is the attacker's to copy: it is no pin of an artifact.
    with pytest.raises(SaeFileError) as caught:
        open_sae(art, sha256=source_pin)
    message = str(caught.value)
    assert f"sha256 expected {source_pin} (pinned), found {tampered}" in message
    assert "pin the artifact itself" in message


def test_source_pin_on_an_untouched_artifact_names_the_right_pin(tmp_path: Path) -> None:
    art, _ = export_two(tmp_path)
    source_pin = sha256_of(tmp_path / "src_a" / "sae_weights.safetensors")
    with pytest.raises(SaeFileError) as caught:
        open_sae(art, sha256=source_pin)
    message = str(caught.value)
    assert message.startswith(f"{art / 'manifest.json'}: sha256 expected {source_pin} (pinned)")
    assert f"pin the artifact itself, {sha256_of(art / 'manifest.json')}" in message


@pytest.mark.parametrize("name", ["weights.safetensors", "encoder.onnx"])
def test_swapped_file_without_a_manifest_rewrite_is_refused_unpinned(
    tmp_path: Path, name: str
) -> None:
    art, other = export_two(tmp_path)
    recorded = json.loads((art / "manifest.json").read_text())["files"][name]
    shutil.copyfile(other / name, art / name)
    with pytest.raises(SaeFileError) as caught:
        open_sae(art)
    assert str(caught.value) == (
        f"{art / name}: sha256 expected {recorded} (from manifest.json), found "
        f"{sha256_of(other / name)}: the file changed after export"
    )


def test_prebuilt_encoder_swapped_after_open_is_refused_at_first_use(tmp_path: Path) -> None:
    art, other = export_two(tmp_path)
    recorded = json.loads((art / "manifest.json").read_text())["files"]["encoder.onnx"]
    sae = open_sae(art)  # fp32 artifact: the full encoder is built from encoder.onnx lazily
    shutil.copyfile(other / "encoder.onnx", art / "encoder.onnx")
    with pytest.raises(SaeFileError) as caught:
        sae.encoder()
    message = str(caught.value)
    assert message.startswith(f"{art / 'encoder.onnx'}: sha256 expected {recorded}")
    assert f"found {sha256_of(other / 'encoder.onnx')}" in message
