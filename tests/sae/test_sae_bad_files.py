"""Bad SAE files are refused with an error naming the file and field, never encoded."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from guard.errors import SaeFileError
from guard.sae import open_sae
from guard.sae.export import export_artifact
from guard.sae.safetensors import SafetensorsFile, bf16_to_float32
from tests.sae_fixtures import (
    random_standard_weights,
    write_gemmascope,
    write_saelens,
    write_safetensors,
    write_sparsify,
)

D_IN, D_SAE = 32, 128


def saelens(tmp_path: Path, **cfg: Any) -> Path:
    return write_saelens(tmp_path / "sae", D_IN, D_SAE, extra_cfg=cfg)


def edit_cfg(folder: Path, **changes: Any) -> None:
    cfg = json.loads((folder / "cfg.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (folder / "cfg.json").write_text(json.dumps(cfg))


def refused(path: Path, *fragments: str, **kwargs: Any) -> str:
    with pytest.raises(SaeFileError) as caught:
        open_sae(path, **kwargs)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_cfg_and_weight_shapes_disagree(tmp_path: Path) -> None:
    folder = saelens(tmp_path)
    edit_cfg(folder, d_in=D_IN + 1)
    refused(
        folder, "sae_weights.safetensors", "'W_enc'", f"[{D_IN + 1}, {D_SAE}]", f"[{D_IN}, {D_SAE}]"
    )


def test_decoder_shape_wrong(tmp_path: Path) -> None:
    weights = random_standard_weights(D_IN, D_SAE)
    weights["W_dec"] = np.ascontiguousarray(weights["W_dec"].T)  # [d_in, d_sae]: transposed
    folder = write_saelens(tmp_path / "sae", D_IN, D_SAE, weights=weights)
    refused(folder, "'W_dec'", f"[{D_SAE}, {D_IN}]", f"found [{D_IN}, {D_SAE}]")


def test_unknown_architecture_lists_the_known_ones(tmp_path: Path) -> None:
    folder = saelens(tmp_path, architecture="matryoshka")
    refused(folder, "cfg.json", "'architecture'", "'matryoshka'", "gated, jumprelu, standard, topk")


@pytest.mark.parametrize("field", ["d_in", "d_sae"])
def test_missing_cfg_field(tmp_path: Path, field: str) -> None:
    folder = saelens(tmp_path)
    edit_cfg(folder, **{field: None})
    refused(folder, "cfg.json", f"missing field {field!r}")


def test_missing_hook_name(tmp_path: Path) -> None:
    folder = saelens(tmp_path)
    edit_cfg(folder, hook_name=None)
    refused(folder, "cfg.json", "hook_name")
    assert (
        open_sae(folder, hook="blocks.2.hook_resid_post").info.hook_name
        == "blocks.2.hook_resid_post"
    )


def test_missing_and_unexpected_tensors(tmp_path: Path) -> None:
    weights: dict[str, Any] = dict(random_standard_weights(D_IN, D_SAE))
    del weights["b_enc"]
    refused(write_saelens(tmp_path / "a", D_IN, D_SAE, weights=weights), "missing tensor 'b_enc'")
    weights = dict(random_standard_weights(D_IN, D_SAE), W_skip=np.zeros((D_IN, D_IN), np.float32))
    refused(
        write_saelens(tmp_path / "b", D_IN, D_SAE, weights=weights), "unexpected tensor", "W_skip"
    )


def test_truncated_safetensors_names_file_and_tensor(tmp_path: Path) -> None:
    folder = saelens(tmp_path)
    path = folder / "sae_weights.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    message = refused(folder, "sae_weights.safetensors", "truncated")
    assert "tensor '" in message
    path.write_bytes(data[:5])
    refused(folder, "sae_weights.safetensors", "truncated")


def test_corrupt_safetensors_headers(tmp_path: Path) -> None:
    folder = saelens(tmp_path)
    path = folder / "sae_weights.safetensors"
    path.write_bytes(struct.pack("<Q", 4) + b"{oops")
    refused(folder, "not valid JSON")

    def header(spec: dict[str, Any], data: bytes) -> None:
        raw = json.dumps(spec).encode()
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)

    header({"W_enc": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8)
    refused(folder, "tensor 'W_enc'", "dtype", "'I64'")
    header({"W_enc": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8)
    refused(folder, "tensor 'W_enc'", "span 8 bytes", "needs 12")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weights(tmp_path: Path, bad: float) -> None:
    weights = random_standard_weights(D_IN, D_SAE)
    weights["W_enc"][3, 7] = bad
    folder = write_saelens(tmp_path / "sae", D_IN, D_SAE, weights=weights)
    refused(folder, "sae_weights.safetensors", "'W_enc'", "NaN/Inf", "[3, 7]")


def test_expected_average_without_a_stored_factor(tmp_path: Path) -> None:
    folder = saelens(tmp_path, normalize_activations="expected_average_only_in")
    refused(folder, "cfg.json", "expected_average_only_in", "activation_scaler.json")
    (folder / "activation_scaler.json").write_text(json.dumps({"scaling_factor": -2}))
    refused(folder, "activation_scaler.json", "'scaling_factor'", "-2")


def test_unknown_normalisation_and_activation(tmp_path: Path) -> None:
    refused(
        saelens(tmp_path / "a", normalize_activations="whiten"),
        "'normalize_activations'",
        "'whiten'",
    )
    refused(saelens(tmp_path / "b", activation_fn="tanh-relu"), "'activation_fn'", "'tanh-relu'")


def test_finetuning_scale_without_the_flag(tmp_path: Path) -> None:
    weights: dict[str, Any] = dict(random_standard_weights(D_IN, D_SAE))
    weights["scaling_factor"] = np.full(D_SAE, 2.0, np.float32)
    refused(
        write_saelens(tmp_path / "a", D_IN, D_SAE, weights=weights), "finetuning_scaling_factor"
    )
    weights["scaling_factor"] = np.ones(D_SAE, np.float32)  # all ones: dropped, as SAELens does
    open_sae(write_saelens(tmp_path / "b", D_IN, D_SAE, weights=weights))


def test_topk_k_out_of_range(tmp_path: Path) -> None:
    refused(saelens(tmp_path / "a", architecture="topk", k=D_SAE + 1), "'k'", f"d_sae={D_SAE}")
    folder = saelens(tmp_path / "b", architecture="topk")
    refused(folder, "missing field 'k'")


def test_pickled_npz_is_refused(tmp_path: Path) -> None:
    layer = tmp_path / "gemma-scope-2b-pt-res" / "layer_1"
    npz = write_gemmascope(
        layer / "params.npz", D_IN, D_SAE, extra={"notes": np.array([{"x": 1}], dtype=object)}
    )
    refused(npz, "params.npz", "'notes'", "pickled")
    npz.write_bytes(pickle.dumps({"W_enc": np.zeros((2, 2))}))
    refused(npz, "params.npz")


def test_gemmascope_missing_or_misshapen_arrays(tmp_path: Path) -> None:
    layer = tmp_path / "gemma-scope-2b-pt-res" / "layer_1"
    npz = write_gemmascope(layer / "params.npz", D_IN, D_SAE)
    with np.load(npz) as data:
        arrays = {k: data[k] for k in data.files}
    del arrays["threshold"]
    with npz.open("wb") as f:
        np.savez(f, **arrays)
    refused(npz, "params.npz", "missing array 'threshold'")
    arrays["threshold"] = np.zeros(D_SAE + 1, np.float32)
    with npz.open("wb") as f:
        np.savez(f, **arrays)
    refused(npz, "params.npz", "'threshold'", f"[{D_SAE}]", f"[{D_SAE + 1}]")
    npz.write_bytes(npz.read_bytes()[:200])
    refused(npz, "params.npz", "truncated")


def test_gemmascope_outside_its_layout_needs_a_hook(tmp_path: Path) -> None:
    npz = write_gemmascope(tmp_path / "mine" / "params.npz", D_IN, D_SAE)
    refused(npz, "params.npz", "hook")


def test_sparsify_bad_files(tmp_path: Path) -> None:
    refused(
        write_sparsify(tmp_path / "a", D_IN, D_SAE, extra_cfg={"activation": "groupmax"}),
        "'activation'",
        "'groupmax'",
    )
    folder = write_sparsify(tmp_path / "b", D_IN, D_SAE, extra_cfg={"num_latents": D_SAE * 2})
    refused(folder, "sae.safetensors", "'encoder.weight'", f"[{D_SAE * 2}, {D_IN}]")
    folder = write_sparsify(tmp_path / "c", D_IN, D_SAE, extra_cfg={"embed_skip": True})
    refused(folder, "'embed_skip'")
    folder = write_sparsify(tmp_path / "d", D_IN, D_SAE, extra_cfg={"skip_connection": True})
    refused(folder, "missing tensor 'W_skip'")


def test_not_an_sae(tmp_path: Path) -> None:
    refused(tmp_path, "not a recognised SAE", "cfg.json")
    refused(tmp_path / "missing", "no such file")


def artifact(tmp_path: Path) -> Path:
    export_artifact(saelens(tmp_path), tmp_path / "art", dtype="fp32", stream=None)
    return tmp_path / "art"


def edit_manifest(folder: Path, **changes: Any) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.update(changes)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_artifact_manifest_file_list_is_checked(tmp_path: Path) -> None:
    folder = artifact(tmp_path)
    files = json.loads((folder / "manifest.json").read_text())["files"]
    manifest = str(folder / "manifest.json")
    edit_manifest(folder, files={"encoder.onnx": files["encoder.onnx"]})
    refused(folder, manifest, "field 'files'", "weights.safetensors")
    edit_manifest(folder, files={**files, "../cfg.json": files["encoder.onnx"]})
    refused(folder, manifest, "field 'files'", "'../cfg.json'")
    edit_manifest(folder, files={**files, "manifest.json": "0" * 64})
    refused(folder, manifest, "field 'files'", "'manifest.json'")
    edit_manifest(folder, files={**files, "encoder.onnx": files["encoder.onnx"].upper()})
    refused(
        folder,
        manifest,
        "field 'files.encoder.onnx'",
        "64 lowercase hex",
        f"found {files['encoder.onnx'].upper()!r}",
    )
    edit_manifest(folder, files={**files, "labels.json": "0" * 64})
    refused(folder, str(folder / "labels.json"), "file listed in manifest.json is missing")


def test_artifact_source_sha256_must_be_a_digest(tmp_path: Path) -> None:
    folder = artifact(tmp_path)
    edit_manifest(folder, sha256="abc")
    refused(folder, str(folder / "manifest.json"), "field 'sha256'", "64 lowercase hex", "'abc'")


def test_artifact_manifest_not_json(tmp_path: Path) -> None:
    folder = artifact(tmp_path)
    (folder / "manifest.json").write_bytes(b"\xff{")
    refused(folder, str(folder / "manifest.json"), "not valid JSON", "not UTF-8")
    (folder / "manifest.json").write_text("[1]")
    refused(folder, str(folder / "manifest.json"), "expected a JSON object, found list")


def test_bf16_is_widened_exactly() -> None:
    values = np.array([1.0, -2.5, 3.140625, 0.0, -0.0, 65280.0], dtype=np.float32)
    bits = (values.view(np.uint32) >> 16).astype(np.uint16)
    np.testing.assert_array_equal(bf16_to_float32(bits), values)


def test_safetensors_reads_rows_without_loading_everything(tmp_path: Path) -> None:
    matrix = np.arange(40, dtype=np.float32).reshape(10, 4)
    write_safetensors(tmp_path / "t.safetensors", {"m": matrix, "h": matrix.astype(np.float16)})
    file = SafetensorsFile(tmp_path / "t.safetensors")
    np.testing.assert_array_equal(file.float32_rows("m", np.array([7, 2])), matrix[[7, 2]])
    np.testing.assert_array_equal(file.float32("h"), matrix)
    with pytest.raises(SaeFileError, match="missing tensor 'x'"):
        file.raw("x")
