"""Evidence providers: Gramine's /dev/attestation file protocol (on a fake directory) and simulated evidence."""

import hashlib
import json
import os
import stat

import pytest

from branchy_tee.core.errors import AttestationError, BranchyError
from branchy_tee.tee.attest.providers import (
    GramineProvider,
    SimulatedProvider,
    code_measurement,
    default_dev_key_dir,
    make_provider,
    simulated_mrenclave,
)
from branchy_tee.verifier.evidence import verify_simulated

RD = hashlib.sha256(b"test").digest() + bytes(32)
RD_OFFSET = 48 + 320  # SGX quote: header (48) + report body offset of REPORTDATA (320)


def fake_attestation_dir(tmp_path, quote: bytes | None, att_type: str = "dcap", name: str = "attestation"):
    d = tmp_path / name
    d.mkdir()
    (d / "attestation_type").write_text(att_type + "\n")
    if quote is not None:
        (d / "quote").write_bytes(quote)
    return d


def with_report_data(quote: bytes, rd: bytes) -> bytes:
    return quote[:RD_OFFSET] + rd + quote[RD_OFFSET + 64 :]


# --------------------------------------------------------------------------- gramine
def test_gramine_file_protocol(tmp_path, sgx_quotes_dir):
    # A fake /dev/attestation whose quote carries RD (Gramine would produce it after the write).
    quote = with_report_data((sgx_quotes_dir / "phala-1.quote.bin").read_bytes(), RD)
    d = fake_attestation_dir(tmp_path, quote)
    prov = GramineProvider(d)
    assert prov.evidence_type == "dcap"
    assert prov.evidence(RD) == quote
    assert (d / "user_report_data").read_bytes() == RD  # written before the quote was read
    assert make_provider("gramine", attestation_dir=d).dir == d


def test_gramine_refusals(tmp_path, sgx_quotes_dir):
    real = (sgx_quotes_dir / "phala-1.quote.bin").read_bytes()
    with pytest.raises(AttestationError, match="attestation_type not found: not running in a Gramine SGX enclave"):
        GramineProvider(tmp_path / "nowhere").evidence(RD)
    with pytest.raises(AttestationError, match="attestation_type is 'none', need 'dcap'"):
        GramineProvider(fake_attestation_dir(tmp_path, real, "none", name="a")).evidence(RD)
    with pytest.raises(AttestationError, match="cannot read .*quote"):
        GramineProvider(fake_attestation_dir(tmp_path, None, name="b")).evidence(RD)
    # a quote that does not carry what was just written (stale, or another process's)
    with pytest.raises(AttestationError, match="does not carry the report data just written"):
        GramineProvider(fake_attestation_dir(tmp_path, real, name="c")).evidence(RD)
    tdx = (sgx_quotes_dir / "phala-2.quote.bin").read_bytes()
    with pytest.raises(AttestationError, match="not an SGX DCAP quote"):
        GramineProvider(fake_attestation_dir(tmp_path, tdx, name="d")).evidence(RD)
    with pytest.raises(AttestationError, match="too short"):
        GramineProvider(fake_attestation_dir(tmp_path, b"\x03\x00" + bytes(100), name="e")).evidence(RD)
    with pytest.raises(ValueError):
        GramineProvider(tmp_path).evidence(b"short")


# --------------------------------------------------------------------------- simulated
def test_dev_key_created_once_with_private_modes(tmp_path, capsys):
    kd = tmp_path / "cfg" / "dev-key"
    a = SimulatedProvider(kd / "shared.key")
    assert stat.S_IMODE(os.stat(kd).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(kd / "shared.key").st_mode) == 0o600
    b = SimulatedProvider(kd / "shared.key")
    assert a.public_key == b.public_key and a.mrsigner == hashlib.sha256(a.public_key).digest()
    ident = a.identity()
    assert ident["mrenclave"] == simulated_mrenclave().hex() and ident["public_key"] == a.public_key.hex()
    os.chmod(kd / "shared.key", 0o640)
    with pytest.raises(BranchyError, match="accessible by others"):
        SimulatedProvider(kd / "shared.key")


def test_default_dev_key_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert default_dev_key_dir() == tmp_path / "branchy-tee" / "dev-attestation-key"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_dev_key_dir() == tmp_path / "home" / ".config" / "branchy-tee" / "dev-attestation-key"
    p = make_provider("simulated")
    assert (tmp_path / "home" / ".config" / "branchy-tee" / "dev-attestation-key" / "ed25519.key").is_file()
    assert p.evidence_type == "simulated"
    with pytest.raises(BranchyError, match="unknown evidence provider"):
        make_provider("sev")


def test_simulated_evidence_round_trip_and_loud_warning(tmp_path, capsys, monkeypatch):
    from branchy_tee.tee.attest import providers

    monkeypatch.setattr(providers, "_explained", False)  # (as in a new process)
    prov = SimulatedProvider(tmp_path / "k", isv_prod_id=3, isv_svn=9)
    capsys.readouterr()
    ev = prov.evidence(RD)
    doc = verify_simulated(ev)
    assert (doc.mrenclave, doc.mrsigner, doc.report_data, doc.public_key) == (
        prov.mrenclave,
        prov.mrsigner,
        RD,
        prov.public_key,
    )
    assert (doc.isv_prod_id, doc.isv_svn, doc.debug) == (3, 9, False)
    prov.evidence(RD)
    err = capsys.readouterr().err
    assert err.count("WARNING: SIMULATED ATTESTATION") == 1  # once per process, never more


def _resign(prov, doc: dict) -> bytes:
    text = json.dumps(doc, sort_keys=True)
    sig = prov._key.sign(b"branchy-tee/v1 simulated-evidence\0" + text.encode())
    return json.dumps({"document": text, "signature": sig.hex()}).encode()


def test_simulated_evidence_tampering(tmp_path):
    prov = SimulatedProvider(tmp_path / "k")
    ev = prov.evidence(RD)
    outer = json.loads(ev)
    doc = json.loads(outer["document"])
    # change a claim without re-signing
    forged = dict(outer, document=json.dumps({**doc, "mrenclave": "00" * 32}, sort_keys=True))
    with pytest.raises(AttestationError, match="signature does not verify"):
        verify_simulated(json.dumps(forged).encode())
    # re-sign with another dev key while claiming this one's public key
    other = SimulatedProvider(tmp_path / "other")
    with pytest.raises(AttestationError, match="signature does not verify"):
        verify_simulated(_resign(other, doc))
    # a correctly signed document whose mrsigner is not the signing key's hash
    with pytest.raises(AttestationError, match="mrsigner is not SHA-256 of the signing key"):
        verify_simulated(_resign(prov, {**doc, "mrsigner": "11" * 32}))
    with pytest.raises(AttestationError, match="'isv_svn' missing or not an integer"):
        verify_simulated(_resign(prov, {**doc, "isv_svn": "1"}))
    with pytest.raises(AttestationError, match="'report_data' must be 64 bytes"):
        verify_simulated(_resign(prov, {**doc, "report_data": "00"}))
    with pytest.raises(AttestationError, match="format is not"):
        verify_simulated(_resign(prov, {**doc, "format": "x"}))
    for junk in (
        b"",
        b"garbage",
        b"[]",
        b'{"document": 1, "signature": "00"}',
        b'{"document": "[]", "signature": "zz"}',
    ):
        with pytest.raises(AttestationError, match="not a signed JSON document"):
            verify_simulated(junk)
    with pytest.raises(AttestationError, match="too large"):
        verify_simulated(b" " * 20000)


def test_code_measurement(tmp_path):
    root = tmp_path / "pkg"
    (root / "sub" / "__pycache__").mkdir(parents=True)
    (root / "a.py").write_text("x = 1\n")
    (root / "sub" / "b.py").write_text("y = 2\n")
    m1 = code_measurement(str(root))
    (root / "sub" / "__pycache__" / "b.cpython-311.pyc").write_bytes(b"cache")
    (root / "c.pyc").write_bytes(b"cache")
    code_measurement.cache_clear()
    assert code_measurement(str(root)) == m1  # byte caches do not count
    (root / "a.py").write_text("x = 2\n")
    code_measurement.cache_clear()
    assert code_measurement(str(root)) != m1
    assert len(code_measurement()) == 32
