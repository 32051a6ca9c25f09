"""End to end on loopback: a model owner's broker, two data owners' brokers, and `predict --attest
simulated` (natively, outside an enclave: pins come from the command line here; the enclave path with
measured pins is in test_trust_chain.py); each data owner can read only its own results. Also the
failures an operator will meet."""

import base64
import json
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.torch import save_file

from branchy_tee.broker.server import start_broker
from branchy_tee.cli import main
from branchy_tee.core.fileio import read_key_file
from branchy_tee.core.keys import key_id
from branchy_tee.tee.attest.identity import identity_hex
from branchy_tee.tee.attest.providers import load_or_create_dev_key, simulated_mrenclave
from branchy_tee.train.trainer import TrainConfig, fit


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny model: one thread is fastest, and immune to oversubscription on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny trained and sealed LeNet-5, three owners' keys, and two encrypted requests."""
    d = tmp_path_factory.mktemp("attested")
    fit(
        TrainConfig(
            net="lenet5",
            dataset="synthetic",
            synthetic={"channels": 1, "size": 28, "n": 300},
            epochs=1,
            lr=3e-3,
            batch_size=50,
            num_workers=0,
            out=str(d / "run"),
            quiet=True,
            seed=1,
            device="cpu",
            max_batches=3,
        )
    )
    for name in ("mo", "do1", "do2"):
        assert main(["keygen", "--out", str(d / f"{name}.key")]) == 0
    assert (
        main(["seal", str(d / "run"), "--key", str(d / "mo.key"), "--out", str(d / "model.btee"), "--version", "1"])
        == 0
    )
    g = torch.Generator().manual_seed(3)
    save_file({"x": torch.rand(5, 1, 28, 28, generator=g)}, str(d / "x1.safetensors"))
    save_file({"x": torch.rand(3, 1, 28, 28, generator=g)}, str(d / "x2.safetensors"))
    for i in (1, 2):
        assert (
            main(
                [
                    "encrypt-input",
                    str(d / f"x{i}.safetensors"),
                    "--bundle",
                    str(d / "model.btee"),
                    "--key",
                    str(d / f"do{i}.key"),
                    "--out",
                    str(d / f"r{i}.req"),
                    "--request-id",
                    f"req-{i}",
                ]
            )
            == 0
        )
    keys = {name: read_key_file(d / f"{name}.key") for name in ("mo", "do1", "do2")}
    return d, keys


IDS = {name: Ed25519PrivateKey.generate() for name in ("mo", "do1", "do2")}  # each owner's broker identity
ALLOWED = [identity_hex(IDS["do1"]), identity_hex(IDS["do2"])]


@pytest.fixture
def xdg(tmp_path, monkeypatch):
    """The simulated provider's dev key lives under XDG_CONFIG_HOME: keep it out of the real home."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return tmp_path / "config"


def sim_policy(**kw) -> dict:
    """Accept the simulated evidence of this process (code and measured settings as now in the environment)."""
    return {"allowed_mrenclave": [simulated_mrenclave().hex()], "allow_simulation": True, **kw}


def mo_policy(**kw) -> dict:
    return sim_policy(allowed_data_owners=ALLOWED, **kw)


def predict_args(d: Path, out: Path, model_url: str, data_urls: list[str], *extra) -> list[str]:
    args = [
        "predict",
        "--bundle",
        str(d / "model.btee"),
        "--input",
        str(d / "r1.req"),
        "--input",
        str(d / "r2.req"),
        "--output",
        str(out / "o1.res"),
        "--output",
        str(out / "o2.res"),
        "--quiet",
        *extra,
    ]
    if model_url:
        args += [
            "--attest",
            "simulated",
            "--model-broker",
            model_url,
            "--model-broker-identity",
            identity_hex(IDS["mo"]),
        ]
    for u in data_urls:
        args += ["--data-broker", u]
    return args


def decrypt(d: Path, result: Path, owner: str, capsys, request: str | None = None) -> tuple[int, object]:
    capsys.readouterr()
    request = request or ("r1.req" if result.name.startswith("o1") else "r2.req")
    rc = main(
        ["decrypt-result", str(result), "--key", str(d / f"{owner}.key"), "--request", str(d / request), "--json"]
    )
    cap = capsys.readouterr()
    return rc, (json.loads(cap.out)["records"] if rc == 0 else cap.err)


def assert_no_key_material(path: Path, keys):
    data = path.read_bytes()
    for k in keys:
        for form in (k, k.hex().encode(), base64.b64encode(k), base64.urlsafe_b64encode(k)):
            assert form not in data


def test_model_owner_and_two_data_owners(world, tmp_path, xdg, capsys):
    d, keys = world
    out = tmp_path / "out"
    logs = {n: tmp_path / f"{n}.audit.jsonl" for n in ("mo", "do1", "do2")}
    with (
        start_broker(d / "mo.key", mo_policy(min_model_version=1), audit_log=logs["mo"], identity=IDS["mo"]) as mo,
        start_broker(d / "do1.key", sim_policy(), audit_log=logs["do1"], identity=IDS["do1"]) as do1,
        start_broker(d / "do2.key", sim_policy(), audit_log=logs["do2"], identity=IDS["do2"]) as do2,
    ):
        assert main(predict_args(d, out, mo.url, [do1.url, do2.url], "--json")) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["samples"] == 8 and stats["requests"] == 2

    rc, recs1 = decrypt(d, out / "o1.res", "do1", capsys)
    assert rc == 0 and len(recs1) == 5
    rc, recs2 = decrypt(d, out / "o2.res", "do2", capsys)
    assert rc == 0 and len(recs2) == 3
    # neither data owner can read the other's answers
    rc, err = decrypt(d, out / "o1.res", "do2", capsys)
    assert rc == 1 and "sealed for data key id" in err
    rc, err = decrypt(d, out / "o2.res", "do1", capsys)
    assert rc == 1 and "sealed for data key id" in err
    # nor can data owner 1 pass data owner 2's result off as the answer to its own request
    rc, err = decrypt(d, out / "o2.res", "do1", capsys, request="r1.req")
    assert rc == 1

    # the same answers as a run with the key files (attestation changes where keys come from, nothing else)
    ref = tmp_path / "ref"
    assert (
        main(
            predict_args(
                d,
                ref,
                "",
                [],
                "--model-key",
                str(d / "mo.key"),
                "--data-key",
                str(d / "do1.key"),
                "--data-key",
                str(d / "do2.key"),
            )
        )
        == 0
    )
    assert decrypt(d, ref / "o1.res", "do1", capsys)[1] == recs1
    assert decrypt(d, ref / "o2.res", "do2", capsys)[1] == recs2

    # each broker released exactly its own key, once, and logged no key material
    for name in ("mo", "do1", "do2"):
        lines = [json.loads(x) for x in logs[name].read_text().splitlines()]
        assert [(ln["decision"], ln["key_ids"]) for ln in lines] == [("granted", [key_id(keys[name])])]
        assert_no_key_material(logs[name], keys.values())


def test_measured_enclave_settings_override_the_hosts_command_line(world, tmp_path, xdg, monkeypatch, capsys):
    d, keys = world
    header = json.loads((d / "model.btee" / "header.json").read_text())["header"]
    ports = {name: _free_port() for name in IDS}
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    load_or_create_dev_key()  # what `enclave build --attest simulated` does: inside, the key is only read
    for name, value in [
        ("ENCLAVE", "1"),
        ("ATTEST", "simulated"),
        ("MODEL_BROKER", urls["mo"]),
        ("MODEL_BROKER_IDENTITY", identity_hex(IDS["mo"])),
        ("DATA_BROKERS", f"{urls['do1']},{urls['do2']}"),
        ("BUNDLE_ID", header["bundle_id"]),
        ("MODEL_KEY_ID", header["key_id"]),
    ]:
        monkeypatch.setenv(f"BRANCHY_TEE_{name}", value)
    # the policies pin the simulated measurement of exactly these measured settings
    with (
        start_broker(d / "mo.key", mo_policy(), identity=IDS["mo"], port=ports["mo"]) as mo,
        start_broker(d / "do1.key", sim_policy(), identity=IDS["do1"], port=ports["do1"]) as do1,
        start_broker(d / "do2.key", sim_policy(), identity=IDS["do2"], port=ports["do2"]) as do2,
    ):
        # the host cannot point the enclave at another model broker, or name another identity
        assert main(predict_args(d, tmp_path, "http://127.0.0.1:9", [])) == 2
        assert "the model broker comes only from its measured settings" in capsys.readouterr().err
        argv = predict_args(d, tmp_path, "", []) + ["--model-broker-identity", "ab" * 32]
        assert main(argv) == 2 and "refused" in capsys.readouterr().err
        # without a command line the measured brokers are used
        assert main(predict_args(d, tmp_path, "", [])) == 0
        assert mo.broker.granted == do1.broker.granted == do2.broker.granted == 1
        assert main(predict_args(d, tmp_path / "x", "", [], "--model-key", str(d / "mo.key"))) == 2
        assert "keys come only from attested key release" in capsys.readouterr().err
        # another measured bundle id: this bundle is refused before any key is asked for
        monkeypatch.setenv("BRANCHY_TEE_BUNDLE_ID", "0" * 32)
        assert main(predict_args(d, tmp_path / "y", "", [])) == 1
        assert "is not the measured bundle" in capsys.readouterr().err and mo.broker.granted == 1


def test_broker_minimum_model_version_refuses_an_old_bundle(world, tmp_path, xdg, capsys):
    d, _ = world
    with (
        start_broker(d / "mo.key", mo_policy(min_model_version=2), identity=IDS["mo"]) as mo,
        start_broker(
            [read_key_file(d / "do1.key"), read_key_file(d / "do2.key")], sim_policy(), identity=IDS["do1"]
        ) as do,
    ):
        assert main(predict_args(d, tmp_path, mo.url, [do.url])) == 1
    err = capsys.readouterr().err
    assert "model version 1 is older than the minimum 2 (rollback refused)" in err
    assert not (tmp_path / "o1.res").exists() and not (tmp_path / "o2.res").exists()


def test_operator_facing_failures_name_the_broker(world, tmp_path, xdg, capsys):
    d, keys = world
    with (
        start_broker(d / "mo.key", {"allowed_mrenclave": [simulated_mrenclave().hex()]}, identity=IDS["mo"]) as strict,
        start_broker(d / "mo.key", mo_policy(), identity=IDS["mo"]) as mo,
        start_broker(d / "do1.key", sim_policy(), identity=IDS["do1"]) as do1,
    ):
        # the model owner's policy does not allow simulation
        assert main(predict_args(d, tmp_path, strict.url, [do1.url])) == 1
        err = capsys.readouterr().err
        assert f"key broker {strict.url} refused: policy refused: simulated evidence refused" in err
        assert "Traceback" not in err and len([ln for ln in err.splitlines() if "error:" in ln]) == 1
        # nobody releases data owner 2's key
        assert main(predict_args(d, tmp_path, mo.url, [do1.url])) == 1
        assert (
            f"no data key broker releases data key id(s) {key_id(keys['do2'])} (asked {do1.url})"
            in capsys.readouterr().err
        )
        dead = do1.url
    # a broker that is not there
    assert main(predict_args(d, tmp_path, dead, [dead])) == 1
    assert f"key broker {dead} is unreachable" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.res"))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_plaintext_results_only_for_the_data_owners_that_allow_them(world, tmp_path, xdg, capsys):
    """The host asks for --plaintext-result with two data owners' requests in one run; only data
    owner 1's broker policy allows plaintext results (signed into its key release), so only its
    request's labels reach the host's file; data owner 2's are withheld, and its sealed result is intact."""
    d, _ = world
    out = tmp_path / "out"
    with (
        start_broker(d / "mo.key", mo_policy(), identity=IDS["mo"]) as mo,
        start_broker(d / "do1.key", sim_policy(allow_plaintext_results=True), identity=IDS["do1"]) as do1,
        start_broker(d / "do2.key", sim_policy(), identity=IDS["do2"]) as do2,
    ):
        text = tmp_path / "plain.tsv"
        assert main(predict_args(d, out, mo.url, [do1.url, do2.url], "--plaintext-result", str(text))) == 0
    lines = text.read_text().splitlines()
    assert lines[0] == "# request req-1" and len([ln for ln in lines if ln[:1].isdigit()]) == 5  # data owner 1's
    assert "# request req-2: withheld (its data owner allows no plaintext results)" in lines
    rc, recs2 = decrypt(d, out / "o2.res", "do2", capsys)
    assert rc == 0 and len(recs2) == 3
