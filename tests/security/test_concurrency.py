"""Two data owners using one running enclave at the same time: each gets exactly its own answers,
sealed so that only it can read them. (The 200-concurrent burst on one key broker is in
tests/test_broker.py; the 30-second load run is fuzz/load.py, in `make fuzz`.)"""

from __future__ import annotations

import argparse
import threading

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from branchy_tee.broker.server import start_broker
from branchy_tee.client.envelopes import open_result
from branchy_tee.core.errors import IntegrityError
from branchy_tee.tee import predict
from branchy_tee.tee.attest.identity import identity_hex
from branchy_tee.tee.attest.providers import simulated_mrenclave
from world import quiet_call

IDS = {o: Ed25519PrivateKey.generate() for o in ("mo", "do1", "do2")}


def _args(world, owner, out, mo_url, do_url):
    p = argparse.ArgumentParser()
    predict.add_arguments(p)
    return p.parse_args(
        [
            "--bundle",
            str(world.bundle),
            "--input",
            str(world.requests[owner]),
            "--output",
            str(out),
            "--attest",
            "simulated",
            "--model-broker",
            mo_url,
            "--model-broker-identity",
            identity_hex(IDS["mo"]),
            "--data-broker",
            do_url,
            "--quiet",
            "--threads",
            "1",
        ]
    )


def test_two_data_owners_in_parallel_runs_never_see_each_others_results(world, tmp_path, xdg):
    policy = {"allowed_mrenclave": [simulated_mrenclave().hex()], "allow_simulation": True}
    mo_policy = {**policy, "allowed_data_owners": [identity_hex(IDS["do1"]), identity_hex(IDS["do2"])]}
    keys = {o: world.key(o) for o in ("mo", "do1", "do2")}
    with (
        quiet_call(start_broker, [keys["mo"]], mo_policy, identity=IDS["mo"])[0] as mo,
        quiet_call(start_broker, [keys["do1"]], policy, identity=IDS["do1"])[0] as b1,
        quiet_call(start_broker, [keys["do2"]], policy, identity=IDS["do2"])[0] as b2,
    ):
        errors, outs = [], {}

        def run(owner, broker, i):
            out = tmp_path / f"{owner}-{i}.res"
            try:
                predict.run(_args(world, owner, out, mo.url, broker.url))  # not quiet_call: redirects are process-wide
                outs[(owner, i)] = out
            except BaseException as e:  # noqa: BLE001 -- reported below
                errors.append(repr(e))

        threads = [
            threading.Thread(target=run, args=(o, b, i)) for i in range(3) for o, b in (("do1", b1), ("do2", b2))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        # each data owner's broker released only its own key, once per run
        assert (mo.broker.granted, b1.broker.granted, b2.broker.granted) == (6, 3, 3)
    for (owner, _), out in outs.items():
        other = "do2" if owner == "do1" else "do1"
        blob = out.read_bytes()
        assert open_result(blob, keys[owner], out.name, world.digest(owner))[1] == world.records[owner]
        with pytest.raises(IntegrityError, match="sealed for data key id"):
            open_result(blob, keys[other], out.name, world.digest(other))
    assert len(outs) == 6
