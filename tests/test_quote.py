"""DCAP quote parsing and verification: real Intel quotes (../shared/testdata/sgx-quotes) and a
synthetic PKI for the branches the real samples cannot reach (revocation, QE out of date, ...)."""

from __future__ import annotations

import base64
import hashlib
import json
import random
import struct
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from branchy_tee.cli import main
from branchy_tee.core.errors import AttestationError
from branchy_tee.tee.attest.quote import INTEL_QE_VENDOR_ID, TdReportBody, parse_quote
from branchy_tee.verifier.dcap import verify_quote
from branchy_tee.verifier.pck import parse_pck_extension
from runs import mutate_bytes

QUOTES = Path(__file__).resolve().parents[1].parent / "shared" / "testdata" / "sgx-quotes"
SKIP_REASON = f"real SGX quotes not found in {QUOTES} (the shared test data sits beside the repo)"
# inside every window of both phala collaterals (TCB info / QE identity / CRLs)
PHALA_NOW = datetime(2025, 6, 20, tzinfo=timezone.utc)
PHALA1_ADVISORIES = ["INTEL-SA-00289", "INTEL-SA-00615"]

SHA256 = {
    "phala-1.quote.bin": "f8b81014b6e443609746822194910f5dc1c92c322fa0584298d1e33e505ca3b5",
    "phala-2.quote.bin": "c42f9164325024bca2757bc8819b11879a0a369132ea4e2b7c85df4805ea72db",
    "mobilecoin-1.quote.bin": "5e3a2ec7d73ffe33c6366006de2b047587a2d02288fd29829520ddb3430d3087",
}


@lru_cache(maxsize=None)
def _data(name: str) -> bytes:
    path = QUOTES / name
    if not path.is_file():
        pytest.skip(SKIP_REASON)
    return path.read_bytes()


def _quote(name: str) -> bytes:
    return _data(f"{name}.quote.bin")


def _collateral(name: str) -> dict:
    return json.loads(_data(f"{name}.collateral.json"))


# =========================================================================== parsing
EXPECTED = {
    "phala-1": dict(
        version=3,
        tee="sgx",
        tee_type=0,
        qe_svn=10,
        pce_svn=15,
        size=4600,
        trailing=0,
        mrenclave="33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb",
        mrsigner="815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6",
        debug=False,
        ca="Intel SGX PCK Processor CA",
        qe_mrsigner=("8c4f5775", "7bff"),
        report_data=b"Hello, world!".ljust(64, b"\0"),
        fmspc="00a067110000",
    ),
    "mobilecoin-1": dict(
        version=3,
        tee="sgx",
        tee_type=0,
        size=4603,
        trailing=0,
        mrenclave="1dd0df84810e53e26b2b167dfe0f97cc4364085fe0bd41d5e18a759c21d5c189",
        mrsigner="d412a4f07ef83892a5915fb2ab584be31e186e5a4f95ab5f6950fd4eb8694d7b",
        debug=True,  # ATTRIBUTES = 0x07: INIT | DEBUG | MODE64BIT
        ca="Intel SGX PCK Processor CA",
        report_data=bytes(64),
        fmspc="00906ed50000",
    ),
    "phala-2": dict(
        version=4,
        tee="tdx",
        tee_type=0x81,
        size=5006,
        trailing=70,
        mrenclave="91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407de03ae6dc5f87f27428b2538873118b7",
        mrsigner="00" * 48,
        debug=False,
        ca="Intel SGX PCK Platform CA",
        qe_mrsigner=("dc9e2a7c", "a8c5"),
        fmspc="b0c06f000000",
    ),
}


def _cn(cert: x509.Certificate) -> str:
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


@pytest.mark.parametrize("name", list(EXPECTED))
def test_parse_real_quotes(name):
    raw = _quote(name)
    assert hashlib.sha256(raw).hexdigest() == SHA256[f"{name}.quote.bin"]
    exp = EXPECTED[name]
    q = parse_quote(raw)
    assert len(raw) == exp["size"]
    assert q.version == q.header.version == exp["version"]
    assert q.header.att_key_type == 2
    assert q.header.tee_type == exp["tee_type"]
    assert q.tee == exp["tee"]
    assert q.header.qe_vendor_id == INTEL_QE_VENDOR_ID
    if "qe_svn" in exp:
        assert (q.header.qe_svn, q.header.pce_svn) == (exp["qe_svn"], exp["pce_svn"])
    assert q.mrenclave.hex() == exp["mrenclave"]
    assert q.mrsigner.hex() == exp["mrsigner"]
    assert (q.isv_prod_id, q.isv_svn) == (0, 0)
    assert q.debug is exp["debug"]
    if "report_data" in exp:
        assert q.report_data == exp["report_data"]
    assert len(q.report_data) == 64
    assert q.trailing_len == exp["trailing"]
    assert q.signed_data == raw[: 48 + (584 if q.tee == "tdx" else 384)]
    sd = q.signature_data
    assert sd.certification_data.cert_type == 5
    assert sd.outer_cert_type == (6 if q.version == 4 else 5)
    assert len(sd.qe_auth_data) == 32
    if "qe_mrsigner" in exp:
        head, tail = exp["qe_mrsigner"]
        assert sd.qe_report.mr_signer.hex().startswith(head) and sd.qe_report.mr_signer.hex().endswith(tail)
    certs = [x509.load_pem_x509_certificate(p) for p in q.pem_chain]
    assert [_cn(c) for c in certs] == ["Intel SGX PCK Certificate", exp["ca"], "Intel SGX Root CA"]
    assert parse_pck_extension(certs[0]).fmspc.hex() == exp["fmspc"]


def test_parse_sizes_from_sources_md():
    q1 = parse_quote(_quote("phala-1"))
    start, _ = q1.span("signature")
    assert struct.unpack_from("<I", q1.raw, start - 4)[0] == 4164
    q2 = parse_quote(_quote("phala-2"))
    start, _ = q2.span("signature")
    assert struct.unpack_from("<I", q2.raw, start - 4)[0] == 4300
    assert q2.raw[-70:] == bytes(70)
    assert isinstance(q2.body, TdReportBody)
    assert q2.body.mr_td == q2.raw[48 + 136 : 48 + 184]
    assert q2.body.tee_tcb_svn.hex().startswith("060103")
    assert q1.pck_chain_pem[0].startswith(b"-----BEGIN CERTIFICATE-----")
    assert parse_quote(_quote("mobilecoin-1")).span("signature")[0] - 4 == 432


# =========================================================================== verification
@pytest.mark.parametrize("name", list(EXPECTED))
def test_verify_without_collateral(name):
    v = verify_quote(_quote(name))
    exp = EXPECTED[name]
    assert (v.version, v.tee, v.mrenclave.hex(), v.debug) == (
        exp["version"],
        exp["tee"],
        exp["mrenclave"],
        exp["debug"],
    )
    assert v.tcb_status is None and v.advisories == [] and v.warnings == []
    assert v.fmspc == exp["fmspc"] and v.pce_id == "0000"


def test_phala1_tcb_status():
    v = verify_quote(_quote("phala-1"), collateral=_collateral("phala-1"), now=PHALA_NOW)
    assert v.tcb_status == "ConfigurationAndSWHardeningNeeded"
    assert v.advisories == PHALA1_ADVISORIES
    assert (v.platform_tcb_status, v.qe_tcb_status) == ("ConfigurationAndSWHardeningNeeded", "UpToDate")
    assert v.warnings == []
    assert v.report_data.startswith(b"Hello, world!")
    assert v.to_json()["fmspc"] == "00a067110000"


def test_tcb_evaluation_data_number():
    # Intel raises it with each TCB recovery; a policy can require a minimum (the lower of the two documents')
    v = verify_quote(_quote("phala-1"), collateral=_collateral("phala-1"), now=PHALA_NOW)
    assert v.tcb_evaluation_data_number == 17
    assert v.collateral.tcb_info.evaluation_data_number == v.collateral.qe_identity.evaluation_data_number == 17
    assert verify_quote(_quote("phala-1"), now=PHALA_NOW).tcb_evaluation_data_number is None


def test_phala2_tdx_tcb_status():
    v = verify_quote(parse_quote(_quote("phala-2")), collateral=_collateral("phala-2"), now=PHALA_NOW)
    assert (v.tee, v.version, v.tcb_status, v.advisories) == ("tdx", 4, "UpToDate", [])
    assert (v.platform_tcb_status, v.qe_tcb_status, v.tdx_module_tcb_status) == ("UpToDate",) * 3


def test_mobilecoin_with_crl_files():
    crls = [_data("mobilecoin-1.root_crl.der"), _data("mobilecoin-1.processor_crl.der")]
    when = datetime(2023, 5, 1, tzinfo=timezone.utc)
    v = verify_quote(_quote("mobilecoin-1"), now=when, crls=crls)
    assert v.debug and v.warnings == []
    late = datetime(2023, 6, 1, tzinfo=timezone.utc)
    with pytest.raises(AttestationError, match="CRL.*expired at 2023-05-21"):
        verify_quote(_quote("mobilecoin-1"), now=late, crls=crls)
    v = verify_quote(_quote("mobilecoin-1"), now=late, crls=crls, strict_time=False)
    assert len(v.warnings) == 1 and "Processor CA" in v.warnings[0]
    # a Processor-CA CRL cannot vouch for a Platform-CA chain
    with pytest.raises(AttestationError, match="Platform CA"):
        verify_quote(_quote("phala-2"), now=when.replace(year=2025), crls=[crls[1]], strict_time=False)
    # a CRL whose signature is broken
    bad = bytearray(crls[0])
    bad[-5] ^= 0x40
    with pytest.raises(AttestationError):
        verify_quote(_quote("mobilecoin-1"), now=when, crls=[bytes(bad)])


def _pem_body_positions(q, i: int) -> list[int]:
    """Offsets of the base64 characters of certificate i (no BEGIN/END lines, no line breaks)."""
    start, end = q.span(f"pem_cert_{i}")
    block = q.raw[start:end]
    first = block.index(b"\n") + 1
    last = block.rindex(b"-----END")
    return [start + k for k in range(first, last) if block[k : k + 1] not in (b"\n", b"\r")]


def test_single_byte_flips_in_signed_regions_are_rejected():
    raw = _quote("phala-1")
    q = parse_quote(raw)
    rng = random.Random(20250620)
    regions = {
        "header+body": range(q.span("header")[0], q.span("body")[1]),
        **{
            n: range(*q.span(n))
            for n in ("qe_report", "qe_report_signature", "signature", "attestation_key", "qe_auth_data")
        },
        **{f"pem_cert_{i}": _pem_body_positions(q, i) for i in range(3)},
    }
    positions = []
    for rng_positions in regions.values():
        positions += rng.sample(list(rng_positions), min(40, len(rng_positions)))
    assert len(positions) >= 200
    for pos in positions:
        mutated = bytearray(raw)
        mutated[pos] ^= rng.randrange(1, 256)
        with pytest.raises(AttestationError) as ei:
            verify_quote(bytes(mutated), now=PHALA_NOW)
        assert ei.value.__cause__ is None, (pos, repr(ei.value.__cause__))
    verify_quote(raw, now=PHALA_NOW)  # and the original still verifies


def test_signature_preserving_certificate_mutation_is_rejected():
    # In phala-1's PCK leaf, base64 char 1515 'D' -> 'T' sets the "unused bits" count of the
    # signature BIT STRING to 1: cryptography still reads the same TBS and signature, so the chain
    # would verify; the verifier insists on 0 unused bits, so the mutated quote is refused.
    raw = _quote("phala-1")
    q = parse_quote(raw)
    start, _ = q.span("pem_cert_0")
    mutated = bytearray(raw)
    assert mutated[start + 1515 : start + 1516] == b"D"
    mutated[start + 1515] ^= 16
    orig = x509.load_pem_x509_certificate(q.pck_chain_pem[0])
    changed = x509.load_pem_x509_certificate(parse_quote(bytes(mutated)).pck_chain_pem[0])
    assert (changed.tbs_certificate_bytes, changed.signature) == (orig.tbs_certificate_bytes, orig.signature)
    with pytest.raises(AttestationError, match="unused bits"):
        verify_quote(bytes(mutated))


def _self_signed_ca(cn: str = "Not Intel Root CA"):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.now(timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=3650))
        .not_valid_after(now + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def test_foreign_root_is_rejected():
    _, other = _self_signed_ca()
    pem = other.public_bytes(serialization.Encoding.PEM)
    for name in ("phala-1", "phala-2"):
        with pytest.raises(AttestationError, match="pinned root"):
            verify_quote(_quote(name), root_pem=pem)
    with pytest.raises(AttestationError):
        verify_quote(_quote("phala-1"), collateral=_collateral("phala-1"), now=PHALA_NOW, root_pem=pem)
    # the Intel root given explicitly (DER) is fine
    verify_quote(_quote("phala-1"), root_pem=_data("intel-sgx-root-ca.der"))


def test_quote_whose_chain_ends_at_another_root_is_rejected():
    raw = _quote("phala-1")
    q = parse_quote(raw)
    _, other = _self_signed_ca("Intel SGX Root CA")  # same name, different key
    cert_data = b"".join(q.pck_chain_pem[:2]) + other.public_bytes(serialization.Encoding.PEM)
    sd = q.signature_data
    forged = _v3_quote(
        q.signed_data,
        sd.signature,
        sd.attestation_key,
        sd.qe_report.raw,
        sd.qe_report_signature,
        sd.qe_auth_data,
        5,
        cert_data,
    )
    assert parse_quote(forged).pem_chain[2] != q.pem_chain[2]
    with pytest.raises(AttestationError, match="pinned root"):
        verify_quote(forged)


def test_collateral_time_windows():
    raw, col = _quote("phala-1"), _collateral("phala-1")
    late = datetime(2025, 8, 1, tzinfo=timezone.utc)
    with pytest.raises(AttestationError, match="TCB info expired at 2025-07-19T10:56:11Z") as ei:
        verify_quote(raw, collateral=col, now=late)
    assert "QE identity expired" in str(ei.value) and "PCK CRL expired" in str(ei.value)
    v = verify_quote(raw, collateral=col, now=late, strict_time=False)
    assert v.tcb_status == "ConfigurationAndSWHardeningNeeded"
    assert {w.split(" expired")[0] for w in v.warnings} == {"PCK CRL", "TCB info", "QE identity"}
    early = datetime(2025, 6, 19, 9, 0, tzinfo=timezone.utc)  # upstream's "now" predates issueDate
    with pytest.raises(AttestationError, match="not valid before"):
        verify_quote(raw, collateral=col, now=early)
    assert verify_quote(raw, collateral=col, now=early, strict_time=False).warnings


def test_tampered_or_mismatched_collateral_is_rejected():
    raw, col = _quote("phala-1"), _collateral("phala-1")

    def check(match, **changes):
        with pytest.raises(AttestationError, match=match):
            verify_quote(raw, collateral={**col, **changes}, now=PHALA_NOW)

    check("TCB info signature", tcb_info=col["tcb_info"].replace("SWHardeningNeeded", "UpToDate", 1))
    check("QE identity signature", qe_identity=col["qe_identity"].replace('"isvsvn":8', '"isvsvn":9'))
    # TCB info "signed" under the PCK chain (a platform key) must not be accepted
    pck_chain = b"".join(parse_quote(raw).pem_chain).decode()
    check("expected 2 certificates|TCB Signing", tcb_info_issuer_chain=pck_chain)
    check("PCK CRL is issued by", pck_crl=_collateral("phala-2")["pck_crl"])
    bad = dict(col)
    del bad["tcb_info"]
    with pytest.raises(AttestationError, match="lacks tcb_info"):
        verify_quote(raw, collateral=bad, now=PHALA_NOW)
    # genuine, correctly signed TDX TCB info / TD QE identity for an SGX quote, and the other way round
    col2 = _collateral("phala-2")
    tdx_tcb = {k: col2[k] for k in ("tcb_info", "tcb_info_signature")}
    tdx_qe = {k: col2[k] for k in ("qe_identity", "qe_identity_signature")}
    check("SGX quote needs SGX TCB info", **tdx_tcb)
    check("QE identity: expected id 'QE'", **tdx_qe)
    with pytest.raises(AttestationError, match="TDX quote needs TDX TCB info"):
        verify_quote(_quote("phala-2"), collateral={**col2, **{k: col[k] for k in tdx_tcb}}, now=PHALA_NOW)
    with pytest.raises(AttestationError, match="PCK CRL is issued by"):
        verify_quote(_quote("phala-2"), collateral={**col2, "pck_crl": col["pck_crl"]}, now=PHALA_NOW)
    for junk in (None, 1, [], "", "zz", {"a": 1}):
        for key in ("tcb_info", "tcb_info_signature", "root_ca_crl", "tcb_info_issuer_chain"):
            with pytest.raises(AttestationError):
                verify_quote(raw, collateral={**col, key: junk}, now=PHALA_NOW)


def test_truncated_quotes_are_rejected():
    for name in ("phala-1", "phala-2"):
        raw = _quote(name)
        end = len(raw) - parse_quote(raw).trailing_len
        for n in range(end):
            with pytest.raises(AttestationError):
                parse_quote(raw[:n])
        for n in range(end, len(raw) + 1):  # trailing padding may be cut
            parse_quote(raw[:n])
    raw = _quote("phala-1")
    for n in range(0, len(raw), 97):
        with pytest.raises(AttestationError):
            verify_quote(raw[:n])


def test_bad_headers_and_garbage():
    raw = bytearray(_quote("phala-1"))
    cases = {
        "version 5": struct.pack("<H", 5),
        "version 2": struct.pack("<H", 2),
        "version 65535": struct.pack("<H", 0xFFFF),
    }
    for match, patch in cases.items():
        bad = bytes(patch) + bytes(raw[2:])
        with pytest.raises(AttestationError, match=match.split()[0]):
            parse_quote(bad)
    with pytest.raises(AttestationError, match="ECDSA-P256"):
        parse_quote(bytes(raw[:2]) + struct.pack("<H", 3) + bytes(raw[4:]))
    with pytest.raises(AttestationError, match="non-SGX"):
        parse_quote(bytes(raw[:4]) + struct.pack("<I", 0x81) + bytes(raw[8:]))
    for junk in (b"", b"\0" * 48, b"\xff" * 5000, bytes(range(256)) * 20, b"-----BEGIN CERTIFICATE-----"):
        with pytest.raises(AttestationError):
            parse_quote(junk)
        with pytest.raises(AttestationError):
            verify_quote(junk)
    with pytest.raises(AttestationError):
        parse_quote("not bytes")  # type: ignore[arg-type]
    # v3 certification data other than a PEM chain parses, but cannot be verified
    q1 = parse_quote(bytes(raw))
    other = bytearray(raw)
    other[q1.span("certification_data")[0] - 6] = 3
    assert parse_quote(bytes(other)).pem_chain == []
    with pytest.raises(AttestationError, match="certification data type 3"):
        verify_quote(bytes(other))
    # a v4 quote whose outer certification data is not type 6
    q2 = bytearray(_quote("phala-2"))
    _, end = parse_quote(bytes(q2)).span("attestation_key")
    q2[end] = 5  # the u16 type right after the attestation key
    with pytest.raises(AttestationError, match="type 5, expected 6"):
        parse_quote(bytes(q2))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=5000))
def test_fuzz_parse_arbitrary_bytes(data):
    try:
        parse_quote(data)
    except AttestationError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(
        [b"\x03\x00\x02\x00\x00\x00\x00\x00", b"\x04\x00\x02\x00\x81\x00\x00\x00", b"\x04\x00\x02\x00\x00\x00\x00\x00"]
    ),
    st.binary(min_size=0, max_size=3000),
)
def test_fuzz_parse_valid_header_then_random(prefix, rest):
    try:
        parse_quote(prefix + rest)
    except AttestationError:
        pass


_mutation = st.tuples(
    st.sampled_from(["xor", "delete", "insert", "set"]), st.integers(0, 10**6), st.binary(min_size=1, max_size=8)
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["phala-1", "phala-2"]), st.lists(_mutation, min_size=1, max_size=4))
def test_fuzz_mutated_real_quotes(name, edits):
    mutated = mutate_bytes(_quote(name), edits)
    try:
        parse_quote(mutated)
    except AttestationError:
        pass
    try:
        verify_quote(mutated, collateral=_collateral(name), now=PHALA_NOW)
    except AttestationError as e:
        # verify_quote turns unexpected exceptions into AttestationError "from" them (fail closed);
        # none should have happened: every rejection is a deliberate one.
        assert e.__cause__ is None, repr(e.__cause__)


# =========================================================================== CLI
def test_cli_json_phala1(capsys):
    _quote("phala-1")  # skips when the shared data is missing
    rc = main(
        [
            "quote",
            "verify",
            str(QUOTES / "phala-1.quote.bin"),
            "--collateral",
            str(QUOTES / "phala-1.collateral.json"),
            "--now",
            "2025-06-20T00:00:00Z",
            "--json",
        ]
    )
    out = capsys.readouterr()
    assert rc == 0, out.err
    obj = json.loads(out.out)
    assert {
        "version",
        "tee",
        "mrenclave",
        "mrsigner",
        "isv_prod_id",
        "isv_svn",
        "debug",
        "report_data",
        "tcb_status",
        "advisories",
    } <= set(obj)
    assert set(obj) - {
        "version",
        "tee",
        "mrenclave",
        "mrsigner",
        "isv_prod_id",
        "isv_svn",
        "debug",
        "report_data",
        "tcb_status",
        "advisories",
    } <= {"fmspc", "pce_id", "warnings"}
    assert obj["version"] == 3 and obj["tee"] == "sgx"
    assert obj["mrenclave"] == EXPECTED["phala-1"]["mrenclave"]
    assert obj["mrsigner"] == EXPECTED["phala-1"]["mrsigner"]
    assert (obj["isv_prod_id"], obj["isv_svn"], obj["debug"]) == (0, 0, False)
    assert obj["report_data"] == (b"Hello, world!".ljust(64, b"\0")).hex()
    assert obj["tcb_status"] == "ConfigurationAndSWHardeningNeeded"
    assert obj["advisories"] == PHALA1_ADVISORIES


def test_cli_human_and_errors(capsys, tmp_path):
    raw = _quote("mobilecoin-1")
    assert main(["quote", "verify", str(QUOTES / "mobilecoin-1.quote.bin")]) == 0
    out = capsys.readouterr().out
    assert EXPECTED["mobilecoin-1"]["mrenclave"] in out and "not checked" in out
    assert main(["quote", "verify", str(QUOTES / "phala-2.quote.bin"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tcb_status"] is None

    flipped = bytearray(raw)
    flipped[100] ^= 0x01  # inside the report body
    path = tmp_path / "flipped.bin"
    path.write_bytes(bytes(flipped))
    assert main(["quote", "verify", str(path), "--json"]) == 1
    cap = capsys.readouterr()
    assert cap.out == ""
    lines = cap.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("branchy-tee: error: ")

    missing = tmp_path / "nope.bin"
    assert main(["quote", "verify", str(missing)]) == 1
    err = capsys.readouterr().err
    assert str(missing) in err and len(err.splitlines()) == 1

    assert (
        main(
            [
                "quote",
                "verify",
                str(QUOTES / "phala-1.quote.bin"),
                "--collateral",
                str(QUOTES / "phala-1.collateral.json"),
                "--now",
                "2025-08-01",
            ]
        )
        == 1
    )
    assert "expired" in capsys.readouterr().err


# =========================================================================== synthetic PKI
# A private root, "PCK" chain and "TCB signing" key, a quote and collateral made here: they reach
# the branches the real samples do not (revocation, QE out of date, no matching TCB level).
def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    b = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(b)]) + b


def _tlv(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + _der_len(len(content)) + content


def _der_oid(dotted: str) -> bytes:
    parts = [int(p) for p in dotted.split(".")]
    out = b""
    for n in [parts[0] * 40 + parts[1], *parts[2:]]:
        chunk = [n & 0x7F]
        n >>= 7
        while n:
            chunk.append(0x80 | (n & 0x7F))
            n >>= 7
        out += bytes(reversed(chunk))
    return _tlv(0x06, out)


def _der_int(v: int) -> bytes:
    b = v.to_bytes(max(1, (v.bit_length() + 8) // 8), "big")
    return _tlv(0x02, b)


SGX = "1.2.840.113741.1.13.1"


FMSPC = bytes.fromhex("00a067110000")


def _sgx_extension(comps, pcesvn, fmspc=FMSPC, pceid=b"\0\0") -> bytes:
    seq = lambda *items: _tlv(0x30, b"".join(items))  # noqa: E731
    tcb = [seq(_der_oid(f"{SGX}.2.{i + 1}"), _der_int(c)) for i, c in enumerate(comps)]
    tcb.append(seq(_der_oid(f"{SGX}.2.17"), _der_int(pcesvn)))
    tcb.append(seq(_der_oid(f"{SGX}.2.18"), _tlv(0x04, bytes(comps))))
    return seq(
        seq(_der_oid(f"{SGX}.1"), _tlv(0x04, b"\x11" * 16)),
        seq(_der_oid(f"{SGX}.2"), seq(*tcb)),
        seq(_der_oid(f"{SGX}.3"), _tlv(0x04, pceid)),
        seq(_der_oid(f"{SGX}.4"), _tlv(0x04, fmspc)),
        seq(_der_oid(f"{SGX}.5"), _tlv(0x0A, b"\x00")),
    )


def _raw_sig(key, data: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _v3_quote(signed, sig, att_key, qe_report, qe_sig, auth, cert_type, cert_data) -> bytes:
    sig_data = (
        sig
        + att_key
        + qe_report
        + qe_sig
        + struct.pack("<H", len(auth))
        + auth
        + struct.pack("<HI", cert_type, len(cert_data))
        + cert_data
    )
    return signed + struct.pack("<I", len(sig_data)) + sig_data


T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)


class FakeIntel:
    """A private root with Intel's certificate names, for round trips under ``root_pem``."""

    def __init__(self, comps=(3,) * 16, pcesvn=11):
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        self.root = self._cert("Intel SGX Root CA", self.root_key, self.root_key, None, ca=True)
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        self.ca = self._cert("Intel SGX PCK Processor CA", self.ca_key, self.root_key, self.root, ca=True)
        self.pck_key = ec.generate_private_key(ec.SECP256R1())
        ext = x509.UnrecognizedExtension(x509.ObjectIdentifier(SGX), _sgx_extension(comps, pcesvn))
        self.pck = self._cert("Intel SGX PCK Certificate", self.pck_key, self.ca_key, self.ca, ca=False, ext=ext)
        self.tcb_key = ec.generate_private_key(ec.SECP256R1())
        self.tcb = self._cert("Intel SGX TCB Signing", self.tcb_key, self.root_key, self.root, ca=False)

    @staticmethod
    def _cert(cn, key, issuer_key, issuer, ca, ext=None):
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        b = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer.subject if issuer else name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(T0 - timedelta(days=1))
            .not_valid_after(T0 + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=not ca,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=ca,
                    crl_sign=ca,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        )
        if issuer is not None:
            b = b.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
            )
        if ext is not None:
            b = b.add_extension(ext, critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    @property
    def root_pem(self) -> bytes:
        return self.root.public_bytes(serialization.Encoding.PEM)

    def quote(self, qe_isvsvn=8, mrenclave=b"\xaa" * 32) -> bytes:
        header = struct.pack("<HHIHH", 3, 2, 0, 8, 11) + INTEL_QE_VENDOR_ID + bytes(20)
        body = bytearray(384)
        body[48] = 0x05  # INIT | MODE64BIT, not debug
        body[64:96] = mrenclave
        body[128:160] = b"\xbb" * 32
        struct.pack_into("<HH", body, 256, 7, 2)
        body[320:384] = b"\xcc" * 64
        att = ec.generate_private_key(ec.SECP256R1())
        nums = att.public_key().public_numbers()
        att_raw = nums.x.to_bytes(32, "big") + nums.y.to_bytes(32, "big")
        auth = bytes(range(32))
        qe = bytearray(384)
        qe[48] = 0x15
        qe[128:160] = b"\x8c" * 32
        struct.pack_into("<HH", qe, 256, 1, qe_isvsvn)
        qe[320:384] = hashlib.sha256(att_raw + auth).digest() + bytes(32)
        chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (self.pck, self.ca, self.root))
        signed = header + bytes(body)
        return _v3_quote(
            signed, _raw_sig(att, signed), att_raw, bytes(qe), _raw_sig(self.pck_key, bytes(qe)), auth, 5, chain
        )

    def crl(self, issuer_cert, issuer_key, revoked=()):
        b = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(issuer_cert.subject)
            .last_update(T0)
            .next_update(T0 + timedelta(days=30))
        )
        for serial in revoked:
            b = b.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(T0).build()
            )
        return b.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER).hex()

    def collateral(
        self, levels, qe_levels, revoked_pck=(), revoked_root=(), signer=None, tcb_evaluation_data_numbers=(1, 1)
    ):
        def stamp(obj, number):
            obj.update(issueDate="2025-01-01T00:00:00Z", nextUpdate="2025-01-31T00:00:00Z")
            if number is not None:
                obj["tcbEvaluationDataNumber"] = number
            return json.dumps(obj, separators=(",", ":"))

        tcb_number, qe_number = tcb_evaluation_data_numbers
        tcb_info = stamp(
            {"id": "SGX", "version": 3, "fmspc": "00A067110000", "pceId": "0000", "tcbType": 0, "tcbLevels": levels},
            tcb_number,
        )
        qe_identity = stamp(
            {
                "id": "QE",
                "version": 2,
                "miscselect": "00000000",
                "miscselectMask": "FFFFFFFF",
                "attributes": "11" + "00" * 15,
                "attributesMask": "FBFFFFFFFFFFFFFF" + "00" * 8,
                "mrsigner": "8C" * 32,
                "isvprodid": 1,
                "tcbLevels": qe_levels,
            },
            qe_number,
        )
        key, cert = signer or (self.tcb_key, self.tcb)
        issuer_chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (cert, self.root)).decode()
        return {
            "pck_crl_issuer_chain": b"".join(
                c.public_bytes(serialization.Encoding.PEM) for c in (self.ca, self.root)
            ).decode(),
            "root_ca_crl": self.crl(self.root, self.root_key, revoked_root),
            "pck_crl": self.crl(self.ca, self.ca_key, revoked_pck),
            "tcb_info_issuer_chain": issuer_chain,
            "tcb_info": tcb_info,
            "tcb_info_signature": _raw_sig(key, tcb_info.encode()).hex(),
            "qe_identity_issuer_chain": issuer_chain,
            "qe_identity": qe_identity,
            "qe_identity_signature": _raw_sig(key, qe_identity.encode()).hex(),
        }


def _level(comps, pcesvn, status, advisories=()):
    return {
        "tcb": {"sgxtcbcomponents": [{"svn": c} for c in comps], "pcesvn": pcesvn},
        "tcbDate": "2024-01-01T00:00:00Z",
        "tcbStatus": status,
        "advisoryIDs": list(advisories),
    }


def _qe_level(isvsvn, status, advisories=()):
    return {
        "tcb": {"isvsvn": isvsvn},
        "tcbDate": "2024-01-01T00:00:00Z",
        "tcbStatus": status,
        "advisoryIDs": list(advisories),
    }


@pytest.fixture(scope="module")
def fake():
    return FakeIntel()


LEVELS = [
    _level([4] * 16, 11, "UpToDate"),
    _level([3] * 16, 11, "ConfigurationNeeded", ["SA-1"]),
    _level([1] * 16, 5, "OutOfDate", ["SA-1", "SA-2"]),
]
QE_LEVELS = [_qe_level(8, "UpToDate"), _qe_level(4, "OutOfDate", ["SA-3"])]
WHEN = T0 + timedelta(days=2)


def test_synthetic_round_trip_and_tcb_levels(fake):
    q = fake.quote()
    v = verify_quote(q, root_pem=fake.root_pem, collateral=fake.collateral(LEVELS, QE_LEVELS), now=WHEN)
    assert (v.tcb_status, v.advisories, v.isv_prod_id, v.isv_svn) == ("ConfigurationNeeded", ["SA-1"], 7, 2)
    # QE out of date on a configuration-needed platform: converged, advisories merged
    v = verify_quote(
        fake.quote(qe_isvsvn=5), root_pem=fake.root_pem, collateral=fake.collateral(LEVELS, QE_LEVELS), now=WHEN
    )
    assert (v.tcb_status, v.advisories) == ("OutOfDateConfigurationNeeded", ["SA-1", "SA-3"])
    assert (v.platform_tcb_status, v.qe_tcb_status) == ("ConfigurationNeeded", "OutOfDate")
    # QE below every QE level: revoked
    v = verify_quote(
        fake.quote(qe_isvsvn=1), root_pem=fake.root_pem, collateral=fake.collateral(LEVELS, QE_LEVELS), now=WHEN
    )
    assert v.tcb_status == "Revoked"
    # one component lower than the level needs: skipped to the next level
    higher = [_level([3] * 15 + [4], 11, "UpToDate"), *LEVELS[1:]]
    v = verify_quote(q, root_pem=fake.root_pem, collateral=fake.collateral(higher, QE_LEVELS), now=WHEN)
    assert v.tcb_status == "ConfigurationNeeded"
    with pytest.raises(AttestationError, match="TCB not supported"):
        verify_quote(q, root_pem=fake.root_pem, collateral=fake.collateral(LEVELS[:1], QE_LEVELS), now=WHEN)
    # the same quote under the real Intel root
    with pytest.raises(AttestationError, match="pinned root"):
        verify_quote(q, now=WHEN)


def test_synthetic_tcb_evaluation_data_number(fake):
    col = fake.collateral(LEVELS, QE_LEVELS, tcb_evaluation_data_numbers=(18, 17))
    v = verify_quote(fake.quote(), root_pem=fake.root_pem, collateral=col, now=WHEN)
    assert (v.collateral.tcb_info.evaluation_data_number, v.tcb_evaluation_data_number) == (18, 17)
    col = fake.collateral(LEVELS, QE_LEVELS, tcb_evaluation_data_numbers=(18, None))
    assert (
        verify_quote(fake.quote(), root_pem=fake.root_pem, collateral=col, now=WHEN).tcb_evaluation_data_number is None
    )
    col = fake.collateral(LEVELS, QE_LEVELS, tcb_evaluation_data_numbers=("18", 17))
    with pytest.raises(AttestationError, match="TCB info: 'tcbEvaluationDataNumber' missing or not a non-negative"):
        verify_quote(fake.quote(), root_pem=fake.root_pem, collateral=col, now=WHEN)


def test_synthetic_revocation(fake):
    q = fake.quote()
    with pytest.raises(AttestationError, match="PCK Certificate.*revoked"):
        verify_quote(
            q,
            root_pem=fake.root_pem,
            now=WHEN,
            collateral=fake.collateral(LEVELS, QE_LEVELS, revoked_pck=[fake.pck.serial_number]),
        )
    with pytest.raises(AttestationError, match="Processor CA.*revoked"):
        verify_quote(
            q,
            root_pem=fake.root_pem,
            now=WHEN,
            collateral=fake.collateral(LEVELS, QE_LEVELS, revoked_root=[fake.ca.serial_number]),
        )
    with pytest.raises(AttestationError, match="TCB Signing.*revoked"):
        verify_quote(
            q,
            root_pem=fake.root_pem,
            now=WHEN,
            collateral=fake.collateral(LEVELS, QE_LEVELS, revoked_root=[fake.tcb.serial_number]),
        )
    # unrelated serials do not matter
    verify_quote(
        q,
        root_pem=fake.root_pem,
        now=WHEN,
        collateral=fake.collateral(LEVELS, QE_LEVELS, revoked_pck=[12345], revoked_root=[678]),
    )


def test_synthetic_collateral_signed_by_platform_key_is_rejected(fake):
    # A compromised platform holds its PCK key: TCB info it signs must not count.
    col = fake.collateral(LEVELS, QE_LEVELS, signer=(fake.pck_key, fake.pck))
    with pytest.raises(AttestationError, match="TCB Signing"):
        verify_quote(fake.quote(), root_pem=fake.root_pem, collateral=col, now=WHEN)


def test_bundled_root_matches_shared_copy():
    from importlib import resources

    bundled = resources.files("branchy_tee.verifier").joinpath("data/intel-sgx-root-ca.pem").read_bytes()
    der = x509.load_pem_x509_certificate(bundled).public_bytes(serialization.Encoding.DER)
    assert hashlib.sha256(der).hexdigest() == "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"
    assert base64.b64encode(der)[:20] == b"MIICjzCCAjSgAwIBAgIU"
