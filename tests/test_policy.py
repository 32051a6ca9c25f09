"""Key-release policy: parsing (typos and unsafe settings are errors) and evaluation on real quote claims."""

import json
import os
import time
from datetime import datetime, timezone

import pytest

from branchy_tee.core.errors import BranchyError, PolicyError
from branchy_tee.verifier.dcap import verify_quote
from branchy_tee.verifier.policy import Claims, Policy, load_policy, parse_policy

PHALA_NOW = datetime(2025, 6, 20, tzinfo=timezone.utc)  # inside the phala collateral windows
MOBILECOIN_NOW = datetime(2023, 5, 1, tzinfo=timezone.utc)
PHALA1_MRENCLAVE = "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
PHALA1_MRSIGNER = "815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6"
MOBILECOIN_MRENCLAVE = "1dd0df84810e53e26b2b167dfe0f97cc4364085fe0bd41d5e18a759c21d5c189"
PHALA2_MRTD = "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407de03ae6dc5f87f27428b2538873118b7"
OTHER = "ab" * 32


@pytest.fixture
def phala1(sgx_quotes_dir) -> Claims:
    col = json.loads((sgx_quotes_dir / "phala-1.collateral.json").read_text())
    return Claims.from_quote(
        verify_quote((sgx_quotes_dir / "phala-1.quote.bin").read_bytes(), collateral=col, now=PHALA_NOW)
    )


@pytest.fixture
def mobilecoin(sgx_quotes_dir) -> Claims:
    # No collateral for this quote: TCB status unknown. It is a DEBUG enclave.
    return Claims.from_quote(verify_quote((sgx_quotes_dir / "mobilecoin-1.quote.bin").read_bytes(), now=MOBILECOIN_NOW))


def sim_claims(**kw) -> Claims:
    base = dict(
        evidence_type="simulated",
        tee="simulated",
        mrenclave=bytes.fromhex(OTHER),
        mrsigner=bytes(32),
        isv_prod_id=0,
        isv_svn=0,
        debug=False,
        report_data=bytes(64),
        signer_key=b"\x01" * 32,
    )
    base.update(kw)
    return Claims(**base)


def pol(**kw) -> Policy:
    return parse_policy({"allowed_mrenclave": [PHALA1_MRENCLAVE], **kw}, "test.toml")


# --------------------------------------------------------------------------- evaluation
def test_real_quote_claims(phala1, mobilecoin):
    assert phala1.mrenclave.hex() == PHALA1_MRENCLAVE and phala1.tcb_status == "ConfigurationAndSWHardeningNeeded"
    assert mobilecoin.debug and mobilecoin.tcb_status is None


def test_default_policy_refuses_a_platform_that_is_not_up_to_date(phala1):
    with pytest.raises(
        PolicyError,
        match=r"accepted_tcb_statuses: the platform's TCB status is "
        r"ConfigurationAndSWHardeningNeeded \(advisories INTEL-SA-00289, "
        r"INTEL-SA-00615\); policy accepts \[UpToDate\]",
    ):
        pol().evaluate(phala1)


def test_policy_accepting_that_status_grants(phala1):
    d = pol(accepted_tcb_statuses=["UpToDate", "ConfigurationAndSWHardeningNeeded"], min_model_version=7).evaluate(
        phala1
    )
    assert d.min_model_version == 7 and d.warnings == ()
    # MRSIGNER alone also identifies it, with the settings digest its REPORTDATA carries
    d = parse_policy(
        {
            "allowed_mrsigner": [PHALA1_MRSIGNER],
            "own_signing_key": True,
            "allowed_settings": [phala1.report_data[32:].hex()],
            "accepted_tcb_statuses": ["ConfigurationAndSWHardeningNeeded"],
        }
    ).evaluate(phala1)
    assert d.min_model_version == 0


def test_mrenclave_and_mrsigner_mismatch_say_expected_and_got(phala1):
    ok = ["ConfigurationAndSWHardeningNeeded"]
    with pytest.raises(
        PolicyError,
        match=f"allowed_mrenclave: MRENCLAVE {PHALA1_MRENCLAVE} is not allowed "
        rf"\(policy allows \[{OTHER}\]\)",
    ):
        parse_policy({"allowed_mrenclave": [OTHER], "accepted_tcb_statuses": ok}).evaluate(phala1)
    with pytest.raises(PolicyError, match=f"allowed_mrsigner: MRSIGNER {PHALA1_MRSIGNER} is not allowed"):
        pol(allowed_mrsigner=[OTHER], accepted_tcb_statuses=ok).evaluate(phala1)


def test_product_id_and_svn(phala1):
    ok = ["ConfigurationAndSWHardeningNeeded"]
    with pytest.raises(PolicyError, match="isv_prod_id: the enclave's ISVPRODID is 0, policy requires 3"):
        pol(isv_prod_id=3, accepted_tcb_statuses=ok).evaluate(phala1)
    with pytest.raises(PolicyError, match="min_isv_svn: the enclave's ISVSVN 0 is below the policy minimum 2"):
        pol(min_isv_svn=2, accepted_tcb_statuses=ok).evaluate(phala1)
    pol(isv_prod_id=0, min_isv_svn=0, accepted_tcb_statuses=ok).evaluate(phala1)


def test_debug_enclave_refused_unless_allowed(mobilecoin):
    p = dict(allowed_mrenclave=[MOBILECOIN_MRENCLAVE], require_collateral=False)
    with pytest.raises(PolicyError, match="allow_debug: the enclave runs in DEBUG mode"):
        parse_policy(p).evaluate(mobilecoin)
    d = parse_policy({**p, "allow_debug": True}).evaluate(mobilecoin)
    assert "TCB status not checked" in d.warnings[0]


def test_unknown_tcb_status_needs_collateral_by_default(mobilecoin):
    with pytest.raises(PolicyError, match="require_collateral: the quote's TCB status is unknown"):
        parse_policy({"allowed_mrenclave": [MOBILECOIN_MRENCLAVE], "allow_debug": True}).evaluate(mobilecoin)


def test_tdx_quote_is_refused(sgx_quotes_dir):
    col = json.loads((sgx_quotes_dir / "phala-2.collateral.json").read_text())
    claims = Claims.from_quote(
        verify_quote((sgx_quotes_dir / "phala-2.quote.bin").read_bytes(), collateral=col, now=PHALA_NOW)
    )
    assert claims.tcb_status == "UpToDate"
    with pytest.raises(PolicyError, match="TDX quote; this policy accepts SGX enclaves only"):
        pol().evaluate(claims)


def test_revoked_is_never_accepted(phala1):
    revoked = Claims(**{**phala1.__dict__, "tcb_status": "Revoked"})
    with pytest.raises(PolicyError, match="TCB status is Revoked"):
        pol(accepted_tcb_statuses=["UpToDate", "OutOfDate"]).evaluate(revoked)
    with pytest.raises(BranchyError, match="'Revoked', which can never be accepted"):
        pol(accepted_tcb_statuses=["Revoked"])
    with pytest.raises(BranchyError, match="can never be accepted"):
        Policy(allowed_mrenclave=frozenset({bytes(32)}), accepted_tcb_statuses=frozenset({"Revoked"}))


def test_simulation(phala1):
    c = sim_claims()
    with pytest.raises(PolicyError, match="simulated evidence refused: the policy has allow_simulation = false"):
        parse_policy({"allowed_mrenclave": [OTHER]}).evaluate(c)
    d = parse_policy({"allowed_mrenclave": [OTHER], "allow_simulation": True}).evaluate(c)
    assert any("simulated" in w for w in d.warnings)
    # simulated claims are held to the same identity checks
    with pytest.raises(PolicyError, match="allowed_mrenclave"):
        pol(allow_simulation=True).evaluate(c)
    with pytest.raises(PolicyError, match="allow_debug"):
        parse_policy({"allowed_mrenclave": [OTHER], "allow_simulation": True}).evaluate(sim_claims(debug=True))
    # pinned dev keys
    pinned = {"allowed_mrenclave": [OTHER], "allow_simulation": True, "simulation_public_keys": ["02" * 32]}
    with pytest.raises(PolicyError, match="simulation_public_keys: simulated evidence is signed by dev key 0101"):
        parse_policy(pinned).evaluate(c)
    parse_policy(pinned).evaluate(sim_claims(signer_key=b"\x02" * 32))


# --------------------------------------------------------------------------- parsing
@pytest.mark.parametrize(
    "data, match",
    [
        ({}, "set allowed_mrenclave"),
        ({"allowed_mrenclave": [], "allowed_mrsigner": []}, "set allowed_mrenclave"),
        ({"allowed_mrsigner": ["11" * 32]}, "pins only allowed_mrsigner, but the host builds and signs the enclave"),
        ({"allowed_mrenclave": ["11" * 32], "accept_client_collateral": True}, "needs min_tcb_evaluation_data_number"),
        ({"allowed_mrenclave": ["11" * 32], "allowed_data_owners": ["xyz"]}, "is not an identity"),
        ({"allowed_mrenclave": ["11" * 32], "allowed_data_owners": "ab"}, "must be a list of strings"),
        ({"allowed_mrenclave": ["11" * 32], "min_tcb_evaluation_data_number": -1}, "must be an integer"),
        (
            {"allowed_mrenclave": [PHALA1_MRENCLAVE], "allow_debugg": True},
            r"unknown setting 'allow_debugg' \(did you mean 'allow_debug'\?\)",
        ),
        ({"allowed_mrenclave": [PHALA1_MRENCLAVE], "policy": {"x": 1}}, "unknown setting 'policy'"),
        ({"allowed_mrenclave": PHALA1_MRENCLAVE}, "allowed_mrenclave must be a list of strings"),
        ({"allowed_mrenclave": ["xyz"]}, "allowed_mrenclave entry 'xyz' is not hex"),
        ({"allowed_mrenclave": ["abcd"]}, "must be 32 bytes"),
        ({"allowed_mrsigner": [PHALA2_MRTD]}, "must be 32 bytes"),
        ({"allowed_mrenclave": [PHALA1_MRENCLAVE], "allow_debug": "no"}, "allow_debug must be true or false"),
        ({"allowed_mrenclave": [PHALA1_MRENCLAVE], "allow_simulation": 1}, "allow_simulation must be true or false"),
        ({"allowed_mrenclave": [PHALA1_MRENCLAVE], "min_isv_svn": -1}, "min_isv_svn must be an integer"),
        ({"allowed_mrenclave": [PHALA1_MRENCLAVE], "isv_prod_id": True}, "isv_prod_id must be an integer"),
        ({"allowed_mrenclave": [PHALA1_MRENCLAVE], "min_model_version": 1.5}, "min_model_version must be an integer"),
        ({"allowed_mrenclave": [PHALA1_MRENCLAVE], "accepted_tcb_statuses": ["UpToDat"]}, "did you mean 'UpToDate'"),
        (
            {"allowed_mrenclave": [PHALA1_MRENCLAVE], "stale_collateral": "ignore"},
            "stale_collateral must be 'reject' or 'warn'",
        ),
        ({"allowed_mrenclave": [PHALA1_MRENCLAVE], "key_ids": []}, "key_ids is empty"),
        ({"allowed_mrenclave": [PHALA1_MRENCLAVE], "key_ids": ["ABCDEF0123456789"]}, "is not a key id"),
        ({"allowed_mrenclave": [PHALA1_MRENCLAVE], "simulation_public_keys": ["00" * 32]}, "allow_simulation = false"),
        (
            {"allowed_mrenclave": [PHALA1_MRENCLAVE], "collateral": "/nonexistent/collateral.json"},
            "cannot read collateral",
        ),
    ],
)
def test_bad_policies_are_errors(data, match):
    with pytest.raises(BranchyError, match=match):
        parse_policy(data, "p.toml")


def test_defaults_are_strict():
    p = pol()
    assert p.accepted_tcb_statuses == {"UpToDate"} and not p.allow_debug and not p.allow_simulation
    assert p.require_collateral and p.stale_collateral == "reject" and p.strict_time
    assert p.key_ids is None and p.releases("0123456789abcdef") and p.min_model_version == 0


def test_load_toml_file_with_relative_collateral(tmp_path, sgx_quotes_dir, phala1):
    (tmp_path / "col.json").write_bytes((sgx_quotes_dir / "phala-1.collateral.json").read_bytes())
    path = tmp_path / "policy.toml"
    path.write_text(f'''
# model owner policy
allowed_mrenclave = ["{PHALA1_MRENCLAVE}"]
accepted_tcb_statuses = ["UpToDate", "ConfigurationAndSWHardeningNeeded"]
min_model_version = 2
collateral = "col.json"
stale_collateral = "warn"
key_ids = ["0123456789abcdef"]
''')
    p = load_policy(path)
    assert p.collateral()["tcb_info"] and p.stale_collateral == "warn" and not p.strict_time
    assert p.key_ids == ("0123456789abcdef",) and not p.releases("fedcba9876543210")
    assert p.evaluate(phala1).min_model_version == 2
    assert p.describe()["collateral"] == str(tmp_path / "col.json")
    # the collateral file is re-read when the owner refreshes it
    before = p.collateral()
    (tmp_path / "col.json").write_text(json.dumps({**before, "marker": 1}))
    os.utime(tmp_path / "col.json", ns=(time.time_ns(), time.time_ns() + 10**9))
    assert p.collateral()["marker"] == 1


def test_load_errors(tmp_path):
    with pytest.raises(BranchyError, match="cannot read policy"):
        load_policy(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("allowed_mrenclave = [\n")
    with pytest.raises(BranchyError, match="is not valid TOML"):
        load_policy(tmp_path / "bad.toml")
    (tmp_path / "typo.toml").write_text(f'allowed_mrenclave = ["{PHALA1_MRENCLAVE}"]\nmin_isvsvn = 3\n')
    with pytest.raises(BranchyError, match=r"typo.toml: unknown setting 'min_isvsvn' \(did you mean 'min_isv_svn'\?\)"):
        load_policy(tmp_path / "typo.toml")
