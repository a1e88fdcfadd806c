"""Neuronpedia labels: bulk explanation exports read and filtered to the SAE's
``neuronpedia_id`` by ``guard sae export --labels`` and ``guard features rank --labels``; the id
and the label count reported by ``Describe`` and ``guard describe``; the id in decision records."""

from __future__ import annotations

import argparse
import gzip
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from guard import FeatureBatch, FeatureRequest, Finding, hookimpl
from guard.audit.cli import _labels as audit_labels
from guard.audit.rank import load_labels
from guard.cli import format_description
from guard.config import GuardConfig, LoggingConfig, PluginsConfig, SaeConfig, ServerConfig
from guard.decision import ActivationRows, Phase
from guard.engine.core import Engine
from guard.engine.plugins import PluginSource
from guard.errors import GuardError, InvalidInput, SaeFileError
from guard.sae import open_sae
from guard.sae.cli import register
from guard.sae.labels import read_feature_labels, read_neuronpedia
from guard.sidecar.server import GuardServer
from guard.v1 import guard_pb2 as pb
from guard.v1 import guard_pb2_grpc as pb_grpc
from guard_plugins.decision_log import DecisionLog
from tests.sae_fixtures import write_gemmascope, write_saelens
from tests.sidecar import short_socket

D_IN, D_SAE = 16, 64
HOOK = "blocks.6.hook_resid_post"
NP_ID = "gemma-2-2b/20-gemmascope-res-16k"


def record(index: int | str, description: str, model: str = "gemma-2-2b",
           layer: str = "20-gemmascope-res-16k", **extra: Any) -> dict[str, Any]:
    """A record as Neuronpedia's export writes it (index a string, extra fields)."""
    return {"modelId": model, "layer": layer, "index": str(index), "description": description,
            "typeName": "oai_token-act-pair", "explanationModelName": "gpt-4o-mini",
            "embedding": None, **extra}


def write_batch(path: Path, records: Sequence[dict[str, Any]], *, gz: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records)
    if gz:
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


@pytest.fixture
def export(tmp_path: Path) -> Path:
    """An explanations folder: batch-2 and batch-10 (natural order: 2 first), gzipped, with a
    second explanation of feature 5 in batch-10 and another SAE's records mixed in."""
    folder = tmp_path / "gemma-2-2b" / "20-gemmascope-res-16k" / "explanations"
    write_batch(folder / "batch-10.jsonl.gz", [
        record(5, "second explanation of 5 (ignored)"),
        record(40, "legal terms"),
        record(7, "another SAE's feature", layer="12-gemmascope-res-16k"),
    ])
    write_batch(folder / "batch-2.jsonl.gz", [
        record(5, "  deception  "),
        record(12, "refusal"),
        record(13, ""),  # no description: no label
    ])
    (folder / "README.txt").write_text("not a batch")
    return folder


# --- reading exports --------------------------------------------------------------------------


def test_a_folder_of_batches_is_read_in_batch_order_and_filtered(export: Path) -> None:
    got = read_neuronpedia([export], D_SAE, neuronpedia_id=NP_ID)
    assert got.labels == {5: "deception", 12: "refusal", 40: "legal terms"}
    assert (got.files, got.records, got.neuronpedia_id) == (2, 6, NP_ID)
    assert got.other_sources == {"gemma-2-2b/12-gemmascope-res-16k": 1}
    assert got.summary() == ("3 feature labels for gemma-2-2b/20-gemmascope-res-16k from 6 "
                             "Neuronpedia records in 2 file(s) (1 records of other SAEs left "
                             "out)")
    # The export's own layout: the SAE's folder holds explanations/.
    assert read_neuronpedia([export.parent], D_SAE, neuronpedia_id=NP_ID).labels == got.labels


def test_files_given_one_by_one_plain_or_gzipped(export: Path, tmp_path: Path) -> None:
    plain = write_batch(tmp_path / "extra.jsonl", [record(63, "last feature")], gz=False)
    files = [export / "batch-2.jsonl.gz", plain]
    got = read_feature_labels(files, D_SAE, neuronpedia_id=NP_ID)
    assert got.labels == {5: "deception", 12: "refusal", 63: "last feature"}


def test_the_other_sae_is_chosen_by_its_id(export: Path) -> None:
    got = read_neuronpedia([export], D_SAE, neuronpedia_id="gemma-2-2b/12-gemmascope-res-16k")
    assert got.labels == {7: "another SAE's feature"}


def test_without_an_id_the_records_must_name_one_sae(export: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"explanations of 2 SAEs \(gemma-2-2b/12-gemmascope-"
                                           r"res-16k \(1\), gemma-2-2b/20-gemmascope-res-16k "
                                           r"\(5\)\): name the one to use with "
                                           r"--neuronpedia-id"):
        read_neuronpedia([export], D_SAE)
    single = write_batch(tmp_path / "one" / "batch-0.jsonl.gz", [record(3, "dates")])
    got = read_neuronpedia([single], D_SAE)
    assert (got.labels, got.neuronpedia_id) == ({3: "dates"}, NP_ID)


def test_an_id_with_no_records_says_what_the_files_hold(export: Path) -> None:
    with pytest.raises(InvalidInput, match=r"expected explanations of gemma-2-2b/"
                                           r"5-gemmascope-res-16k, found none \(the files hold "
                                           r"gemma-2-2b/12-gemmascope-res-16k \(1\), "
                                           r"gemma-2-2b/20-gemmascope-res-16k \(5\)\)"):
        read_neuronpedia([export], D_SAE, neuronpedia_id="gemma-2-2b/5-gemmascope-res-16k")


def test_bad_records_name_the_file_and_line(tmp_path: Path) -> None:
    bad = write_batch(tmp_path / "batch-0.jsonl.gz", [record(1, "a"), record(99, "b")])
    with pytest.raises(InvalidInput, match=r"batch-0.jsonl.gz:2: field 'index': expected a "
                                           r"feature id in \[0, 64\), found 99"):
        read_neuronpedia([bad], D_SAE, neuronpedia_id=NP_ID)
    bad.write_bytes(gzip.compress(b'{"modelId": "gemma-2-2b"}\n{not json\n'))
    with pytest.raises(InvalidInput, match=r"batch-0.jsonl.gz:1: field 'layer': expected a "
                                           "string"):
        read_neuronpedia([bad], D_SAE, neuronpedia_id=NP_ID)
    bad.write_bytes(gzip.compress(json.dumps(record(1, "a")).encode() + b"\n{not json\n"))
    with pytest.raises(InvalidInput, match=r"batch-0.jsonl.gz:2: expected one JSON object a "
                                           r"line .*invalid JSON"):
        read_neuronpedia([bad], D_SAE, neuronpedia_id=NP_ID)
    bad.write_bytes(b"\x1f\x8b\x08\x00 truncated gzip")
    with pytest.raises(InvalidInput, match=r"batch-0.jsonl.gz: cannot read the labels file"):
        read_neuronpedia([bad], D_SAE, neuronpedia_id=NP_ID)
    with pytest.raises(InvalidInput, match=r"neuronpedia_id: expected a Neuronpedia id "
                                           r"'model/<layer>-<set>'"):
        read_neuronpedia([bad], D_SAE, neuronpedia_id="gemma-2-2b")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidInput, match=r"empty: expected Neuronpedia explanation files"):
        read_neuronpedia([empty], D_SAE)


def test_without_an_id_ids_beyond_the_sae_suggest_another_sae(tmp_path: Path) -> None:
    wide = write_batch(tmp_path / "batch-0.jsonl.gz", [record(1, "a"), record(4000, "b")])
    with pytest.raises(InvalidInput, match=r"feature 4000 has a label but the SAE has only 64 "
                                           r"features.*give --neuronpedia-id"):
        read_neuronpedia([wide], D_SAE)


# --- guard sae export --labels, the id in SAEs' metadata -------------------------------------


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="guard")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    code: int = args.func(args)
    return code


def saelens_with_id(tmp_path: Path, neuronpedia_id: str | None = NP_ID) -> Path:
    meta: dict[str, Any] = {"hook_name": HOOK, "neuronpedia_id": neuronpedia_id}
    return write_saelens(tmp_path / "sae", D_IN, D_SAE, hook_name=HOOK,
                         extra_cfg={"metadata": meta})


def test_export_keeps_the_saes_labels_and_id(tmp_path: Path, export: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    source = saelens_with_id(tmp_path)
    assert open_sae(source).info.neuronpedia_id == NP_ID  # SAELens 6.x metadata.neuronpedia_id
    artifact = tmp_path / "artifact"
    assert run("sae", "export", str(source), str(artifact), "--labels", str(export)) == 0
    assert "3 feature labels for gemma-2-2b/20-gemmascope-res-16k" in capsys.readouterr().err
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["neuronpedia_id"] == NP_ID
    assert manifest["feature_labels"] == {"5": "deception", "12": "refusal", "40": "legal terms"}
    info = open_sae(artifact).info
    assert (info.neuronpedia_id, dict(info.feature_labels)) == (
        NP_ID, {5: "deception", 12: "refusal", 40: "legal terms"})


def test_export_with_an_explicit_id_and_several_files(tmp_path: Path, export: Path) -> None:
    """A params.npz names no Neuronpedia id: --neuronpedia-id gives it (and picks the
    records); a pre-6.0 SAELens cfg's top-level neuronpedia_id is read too."""
    npz = write_gemmascope(tmp_path / "layer_20" / "width_16k" / "average_l0_71" / "params.npz",
                           D_IN, D_SAE)
    artifact = tmp_path / "artifact"
    assert run("sae", "export", str(npz), str(artifact), "--hook", HOOK,
               "--neuronpedia-id", "gemma-2-2b/12-gemmascope-res-16k",
               "--labels", *map(str, sorted(export.glob("*.jsonl.gz")))) == 0
    info = open_sae(artifact).info
    assert (info.neuronpedia_id, dict(info.feature_labels)) == (
        "gemma-2-2b/12-gemmascope-res-16k", {7: "another SAE's feature"})
    old = write_saelens(tmp_path / "old", D_IN, D_SAE, hook_name=HOOK,
                        extra_cfg={"neuronpedia_id": "gpt2-small/6-res-jb"})
    assert open_sae(old).info.neuronpedia_id == "gpt2-small/6-res-jb"


def test_an_sae_without_id_and_a_mixed_export_is_refused(tmp_path: Path, export: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    source = saelens_with_id(tmp_path, None)
    assert open_sae(source).info.neuronpedia_id is None
    assert run("sae", "export", str(source), str(tmp_path / "a"), "--labels", str(export)) == 1
    assert "name the one to use with --neuronpedia-id" in capsys.readouterr().err


def test_a_malformed_id_in_an_saes_metadata_names_the_field(tmp_path: Path) -> None:
    source = saelens_with_id(tmp_path, "gemma-2-2b 20-gemmascope-res-16k")
    with pytest.raises(SaeFileError, match=r"cfg.json: field 'metadata.neuronpedia_id': "
                                           r"expected a Neuronpedia id"):
        open_sae(source)


def test_the_json_mapping_form_still_works(tmp_path: Path) -> None:
    mapping = tmp_path / "labels.json"
    mapping.write_text(json.dumps({"3": "dates"}))
    got = read_feature_labels(mapping, D_SAE)
    assert (got.labels, got.neuronpedia_id) == ({3: "dates"}, None)
    with pytest.raises(InvalidInput, match="a JSON mapping comes alone"):
        read_feature_labels([mapping, mapping], D_SAE)


# --- guard features rank --labels ---------------------------------------------------------


def test_features_rank_labels_use_the_saes_id(tmp_path: Path, export: Path) -> None:
    sae = open_sae(saelens_with_id(tmp_path))
    args = argparse.Namespace(labels=[export], neuronpedia_id=None)
    assert audit_labels(args, sae) == {5: "deception", 12: "refusal", 40: "legal terms"}
    args = argparse.Namespace(labels=[export], neuronpedia_id="gemma-2-2b/12-gemmascope-res-16k")
    assert audit_labels(args, sae) == {7: "another SAE's feature"}
    assert load_labels([export / "batch-2.jsonl.gz"], D_SAE, neuronpedia_id=NP_ID) == {
        5: "deception", 12: "refusal"}
    with pytest.raises(GuardError, match="--neuronpedia-id"):
        load_labels(export, D_SAE)


# --- Describe and decision records --------------------------------------------------------


def labelled_artifact(tmp_path: Path, export: Path) -> Path:
    artifact = tmp_path / "artifact"
    assert run("sae", "export", str(saelens_with_id(tmp_path)), str(artifact),
               "--labels", str(export)) == 0
    return artifact


def config(tmp_path: Path, artifact: Path, **plugins: Any) -> GuardConfig:
    return GuardConfig(
        server=ServerConfig(listen=f"unix://{short_socket('np')}", drain_grace_seconds=0),
        logging=LoggingConfig(level="warning"),
        saes=(SaeConfig(path=artifact),),
        plugins=PluginsConfig(autoload=False, timeout_ms=30_000, **plugins),
    )


@pytest.fixture
def served(tmp_path: Path, export: Path) -> Iterator[GuardServer]:
    cfg = config(tmp_path, labelled_artifact(tmp_path, export))
    server = GuardServer(cfg)
    server.start()
    try:
        server.set_ready(Engine.load(cfg))
        yield server
    finally:
        server.stop(0)


def test_describe_reports_the_neuronpedia_id_and_label_count(served: GuardServer) -> None:
    with grpc.insecure_channel(served.addresses[0]) as channel:
        reply = pb_grpc.GuardStub(channel).Describe(pb.DescribeRequest())
    (sae,) = reply.saes
    assert (sae.neuronpedia_id, sae.label_count) == (NP_ID, 3)
    text = format_description(reply, "here")
    assert f"    neuronpedia {NP_ID} (https://www.neuronpedia.org/{NP_ID}/FEATURE)" in text
    assert f"    labels      3 of {D_SAE} features" in text


def test_describe_without_an_id(tmp_path: Path) -> None:
    cfg = config(tmp_path, saelens_with_id(tmp_path, None))
    server = GuardServer(cfg)
    server.start()
    try:
        server.set_ready(Engine.load(cfg))
        with grpc.insecure_channel(server.addresses[0]) as channel:
            reply = pb_grpc.GuardStub(channel).Describe(pb.DescribeRequest())
    finally:
        server.stop(0)
    (sae,) = reply.saes
    assert (sae.neuronpedia_id, sae.label_count) == ("", 0)
    text = format_description(reply, "here")
    assert "neuronpedia" not in text and f"labels      0 of {D_SAE} features" in text


class Flagger:
    """Flags every batch on features 5 and 12."""

    @hookimpl
    def guard_subscriptions(self) -> list[FeatureRequest]:
        return [FeatureRequest(HOOK, (5, 12))]

    @hookimpl
    def guard_detect(self, batch: FeatureBatch) -> list[Finding]:
        return [Finding("flagger", 1.0, 0.0, "flag", feature_ids=(5, 12))]


def test_decision_records_name_the_saes_neuronpedia_id(tmp_path: Path, export: Path) -> None:
    log = tmp_path / "decisions.jsonl"
    cfg = config(tmp_path, labelled_artifact(tmp_path, export),
                 config={"decision_log": {"path": str(log)}})
    engine = Engine.load(cfg, extra_plugins=[PluginSource("flagger", "1", Flagger()),
                                             PluginSource("decision_log", "1", DecisionLog)])
    try:
        rows = np.random.default_rng(0).normal(size=(2, D_IN)).astype(np.float32)
        decision = engine.inspect(ActivationRows("req-1", 1, HOOK, rows,
                                                 np.arange(2, dtype=np.int64), None,
                                                 Phase.PROMPT), {})
    finally:
        engine.close(timeout=10)
    assert decision.sae_neuronpedia_id == NP_ID
    (finding,) = decision.findings
    assert finding.feature_labels == ("deception", "refusal")
    (line,) = [json.loads(text) for text in log.read_text().splitlines()]
    assert line["sae_neuronpedia_id"] == NP_ID
    assert line["findings"][0]["feature_labels"] == ["deception", "refusal"]
