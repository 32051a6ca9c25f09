"""The tamper campaign, short: 30 trials per artifact (10 flips, 10 truncations, 10 extensions) with a
fixed seed. ``make fuzz`` runs it with 1,000 per artifact (fuzz/campaign.py)."""

from __future__ import annotations

import random

import pytest

from campaign import (
    MODES,
    ClientResponseTarget,
    Outcome,
    PredictTarget,
    format_details,
    format_table,
    run_campaign,
    tamper,
)

TRIALS = 30


def test_tamper_helper_always_changes_the_bytes():
    rng = random.Random(1)
    for data in (b"", b"x", bytes(range(256))):
        for mode in MODES:
            for _ in range(50):
                assert tamper(data, mode, rng)[0] != data


def test_short_tamper_campaign(world, tmp_path, capsys):
    rows, problems = run_campaign(world, tmp_path, TRIALS, seed=2026)
    with capsys.disabled():
        print("\n" + format_table(rows))
    names = {r.artifact for r in rows}
    assert {
        "bundle/header.json",
        "bundle/stage-00.bin",
        "bundle/stage-02.bin",
        "request (predict)",
        "result (decrypt-result)",
        "broker/POST /v1/keys body",
        "client/GET /v1/nonce response",
        "client/POST /v1/keys response",
        "result replayed for a new request",
        "client/impersonated model broker",
    } <= names
    assert not problems, problems
    bad = [f for r in rows for f in r.findings]
    assert sum(r.accepted + r.crashes for r in rows) == 0, "\n" + format_details(rows)
    assert not bad
    for r in rows:
        assert r.trials == TRIALS and r.rejected + r.benign == TRIALS
        if r.artifact.startswith(("bundle/", "request", "result", "client/impersonated")):
            assert r.benign == 0, (r.artifact, r.benign_why)  # every byte authenticated: nothing can be benign


def test_the_campaign_notices_an_accepted_tamper(world, tmp_path, monkeypatch):
    """The harness itself: a consumer that ignored authentication would show up as benign (same answers)
    or accepted (different answers), never as rejected."""
    import io

    from branchy_tee.tee.sealed import aead

    target = PredictTarget(world, tmp_path, "stage-02.bin")
    real = aead.open_chunks

    def lenient(key, f, context, size, chunk, what, into=None):  # decrypts the pristine bytes, whatever is on disk
        pristine = what.endswith("stage-02.bin")
        return real(key, io.BytesIO(target.data) if pristine else f, context, size, chunk, what, into)

    monkeypatch.setattr(aead, "open_chunks", lenient)
    assert target.run(target.data[:-1] + b"\0").kind == "benign"

    def wrong(key, f, context, size, chunk, what, into=None):  # ... and then changes the weights
        from branchy_tee.tee.graphs import unpack

        out = lenient(key, f, context, size, chunk, what, into)
        if what.endswith("stage-02.bin"):  # zero the weight blob in place: still a valid graph
            _, blob = unpack(out, what)
            blob[:] = bytes(len(blob))
        return out

    monkeypatch.setattr(aead, "open_chunks", wrong)
    assert target.run(target.data[:-1] + b"\0").kind == "accepted"


@pytest.mark.parametrize("which", ["nonce", "keys"])
def test_untampered_recorded_responses_are_accepted(world, tmp_path, which):
    """The canned broker responses work when unchanged, so rejections in the campaign are real."""
    from branchy_tee.core.keys import generate_key

    keys = [generate_key(), generate_key()]
    t = ClientResponseTarget(tmp_path, keys, which)
    out = t.run(t.data)
    assert out == Outcome("benign", "JSON whitespace, hex case or base64 padding bits: same decoded content")
