"""The typed artifacts: each parses strictly (a missing, unexpected or mistyped member is one line that
names the file and the member) and writes back exactly the JSON it was parsed from, so files written
before the types existed stay readable and their MACs and signatures stay valid."""

import json

import pytest

from branchy_tee.core.choices import EvidenceProvider
from branchy_tee.core.errors import BranchyError, IntegrityError
from branchy_tee.gramine.launch import LaunchBackend
from branchy_tee.models.card import ModelCard
from branchy_tee.tee.criteria import ENTROPY, MAXPROB, NAMES, criterion
from branchy_tee.tee.sealed.envelope import RequestHeader, ResultHeader
from branchy_tee.tee.sealed.header import BundleHeader

# model.json as training and calibration have always written it (key order included)
CARD = {
    "format": "branchy-tee/model/v1",
    "arch": "lenet5",
    "config": {"num_classes": 2, "in_channels": 1},
    "classes": ["a", "b"],
    "dataset": "synthetic",
    "preprocessing": {"input_shape": [1, 28, 28], "scale": 1 / 255, "mean": [0.5], "std": [0.25]},
    "criterion": "entropy",
    "thresholds": [0.25, 0.5],
    "stage_flops": [10, 20, 30],
    "head_flops": [1, 2, 3],
    "data": {"dataset": "synthetic", "synthetic": {"seed": 0}, "val_fraction": 0.1, "seed": 0},
    "training": {"config": {"lr": 0.001}, "world_size": 1, "best_epoch": 2},
    "calibration": {
        "criterion": "entropy",
        "thresholds": [0.25, 0.5],
        "accuracy": 0.9,
        "mean_flops": 31.5,
        "exit_fractions": [0.5, 0.25, 0.25],
        "final_accuracy": 0.91,
        "full_flops": 33,
        "max_accuracy_drop": 0.01,
        "margin_se": 1.0,
        "samples": 100,
    },
}
HEADER = {
    "format": "branchy-tee/bundle/v2",
    "bundle_id": "ab" * 16,
    "model_version": 2,
    "key_id": "cd" * 8,
    **{
        k: CARD[k]
        for k in ("arch", "config", "classes", "preprocessing", "criterion", "thresholds", "stage_flops", "head_flops")
    },
    "chunk_size": 4096,
    "stages": [
        {
            "index": k,
            "file": f"stage-{k:02d}.bin",
            "plaintext_size": 100,
            "weight_bytes": 50,
            "activation_elems": 784,
            "sealed_size": 116,
        }
        for k in range(3)
    ],
}


def test_model_card_round_trips_byte_for_byte_and_replace_checks():
    text = json.dumps(CARD, indent=2) + "\n"
    card = ModelCard.parse(json.loads(text), "run/model.json")
    assert json.dumps(card.to_json(), indent=2) + "\n" == text
    assert card.criterion is ENTROPY and card.preprocessing.input_shape == (1, 28, 28)
    assert card.calibration is not None and card.calibration.samples == 100
    assert card.replace(thresholds=None).exit_thresholds() == (ENTROPY.never,) * 2
    with pytest.raises(BranchyError, match="3 thresholds for 2 early exits"):
        card.replace(thresholds=(0.1, 0.2, 0.3))
    # optional sections are left out, not written as null
    bare = {k: v for k, v in CARD.items() if k not in ("data", "training", "calibration")}
    assert ModelCard.parse(bare, "m").to_json() == bare


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda d: d.pop("head_flops"), "run/model.json: field 'head_flops' is missing"),
        (lambda d: d.update(note=1), "run/model.json: field 'note' is not expected"),
        (lambda d: d.update(thresholds="0.5"), "run/model.json: field 'thresholds' must be a list of finite numbers"),
        (
            lambda d: d["preprocessing"].update(std=[0]),
            "field 'preprocessing.std' must be a list of 1 positive numbers",
        ),
        (lambda d: d["data"].pop("seed"), "field 'data.seed' is missing"),
        (lambda d: d.update(criterion="margin"), "field 'criterion' must be one of entropy, maxprob"),
        (lambda d: d["config"].update(num_classes=True), "config needs num_classes and in_channels"),
        (lambda d: d.update(format="branchy-tee/model/v0"), "not a branchy-tee model description"),
    ],
    ids=["missing", "unknown", "type", "nested", "section", "criterion", "bool-is-not-int", "format"],
)
def test_model_card_refusals_are_one_line_naming_file_and_field(change, match):
    doc = json.loads(json.dumps(CARD))
    change(doc)
    with pytest.raises(BranchyError, match=match) as e:
        ModelCard.parse(doc, "run/model.json")
    assert "\n" not in str(e.value)


def test_bundle_header_round_trips_and_refuses_what_the_runtime_cannot_use():
    h = BundleHeader.parse(json.loads(json.dumps(HEADER)), "m.btee/header.json")
    assert h.to_json() == HEADER and list(h.to_json()) == list(HEADER)  # the same members, in the same order
    assert h.model_ref.to_json() == {"bundle_id": "ab" * 16, "model_version": 2, "model_key_id": "cd" * 8}
    for change, match in [
        (lambda d: d["stages"][1].update(file="stage-07.bin"), r"field 'stages\[1\].file' must be 'stage-01.bin'"),
        (lambda d: d["stages"][2].update(index=2.0), r"field 'stages\[2\].index' must be 2"),
        (lambda d: d.update(chunk_size=0), "field 'chunk_size' must be an integer >= 1"),
        (lambda d: d.update(stages=d["stages"][:2]), "2 stages for 3 exits"),
        (lambda d: d.update(key_id="not a key id"), "field 'key_id' must be a key id"),
    ]:
        doc = json.loads(json.dumps(HEADER))
        change(doc)
        with pytest.raises(IntegrityError, match=match):
            BundleHeader.parse(doc, "m.btee/header.json")


def test_envelope_headers_round_trip_and_are_strict():
    req = {
        "format": "branchy-tee/request/v1",
        "request_id": "r1",
        "samples": 3,
        "shape": [1, 28, 28],
        "dtype": "float32",
        "key_id": "ab" * 8,
    }
    assert RequestHeader.parse(req, "req").to_json() == req
    res = {
        "format": "branchy-tee/result/v2",
        "request_id": "r1",
        "request_sha256": "ef" * 32,
        "bundle_id": "ab" * 16,
        "model_version": 1,
        "model_key_id": "cd" * 8,
        "samples": 3,
        "key_id": "ab" * 8,
    }
    assert ResultHeader.parse(res, "res").to_json() == res
    with pytest.raises(IntegrityError, match="res: field 'samples' must be an integer >= 0"):
        ResultHeader.parse({**res, "samples": "3"}, "res")
    with pytest.raises(IntegrityError, match="req: field 'extra' is not expected"):
        RequestHeader.parse({**req, "extra": 1}, "req")


def test_criteria_are_objects_looked_up_by_name():
    assert criterion("entropy") is ENTROPY and criterion("maxprob") is MAXPROB and NAMES == ("entropy", "maxprob")
    with pytest.raises(BranchyError, match="unknown exit criterion 'margin'; choose one of: entropy, maxprob"):
        criterion("margin")
    import numpy as np

    log_probs = np.log(np.array([[1.0, 0.0], [0.5, 0.5]], dtype=np.float32) + 1e-30)
    for c in (ENTROPY, MAXPROB):
        scores = c.score(log_probs)
        assert c.passes(scores, c.always).all() and not c.passes(scores, c.never).any()
    assert ENTROPY.passes(ENTROPY.score(log_probs), 0.5).tolist() == [True, False]


def test_enum_values_are_their_strings():
    assert json.dumps({"attest": EvidenceProvider.SIMULATED}) == '{"attest": "simulated"}'
    assert f"{LaunchBackend.NATIVE}" == "native" and EvidenceProvider("gramine") is EvidenceProvider.GRAMINE
    assert LaunchBackend.names() == ("sgx", "direct", "native")


def test_release_statement_round_trips_and_names_the_bad_member():
    from branchy_tee.gramine.release import ReleaseStatement

    doc = {
        "format": "branchy-tee/release/v3",
        "attest": "simulated",
        "mrenclave": "ab" * 32,
        "mrsigner": "12" * 32,
        "isv_prod_id": 0,
        "isv_svn": 1,
        "debug": False,
        "bundle_id": "cd" * 16,
        "model_version": 1,
        "model_key_id": "ef" * 8,
        "min_model_version": 1,
        "model_broker": "http://127.0.0.1:8000",
        "model_broker_identity": "5a" * 32,
        "manifest_sha256": None,
        "dev_public_key": "34" * 32,
        "measured": {
            "loader.env.BRANCHY_TEE_ATTEST": "simulated",
            "loader.env.BRANCHY_TEE_SETTINGS_SHA256": "56" * 32,
            "sgx.debug": False,
        },
        "dangerous": ["simulated"],
        "released_at": "2026-01-02T03:04:05Z",
        "model_owner": "5a" * 32,
    }
    s = ReleaseStatement.parse(dict(doc), "release.json")
    assert s.to_json() == doc and list(s.to_json()) == list(doc) and s.attest is EvidenceProvider.SIMULATED
    with pytest.raises(BranchyError, match="'dangerous' does not name exactly"):
        ReleaseStatement.parse({**doc, "dangerous": []}, "release.json")
    with pytest.raises(BranchyError, match="release.json: field 'isv_svn' must be a 16-bit number"):
        ReleaseStatement.parse({**doc, "isv_svn": 1 << 16}, "release.json")
    with pytest.raises(BranchyError, match="'dev_public_key' is for simulated builds"):
        ReleaseStatement.parse({**doc, "dev_public_key": None}, "release.json")
    with pytest.raises(BranchyError, match="measured settings digest .* is missing"):
        ReleaseStatement.parse({**doc, "measured": {"loader.env.BRANCHY_TEE_ATTEST": "simulated"}}, "release.json")
