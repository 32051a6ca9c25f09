"""The demo's batch acts, one method each: train and seal, trust, encrypt, the enclave's runs,
decrypt, staged loading."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from branchy_tee.core.choices import EvidenceProvider
from branchy_tee.core.errors import BranchyError
from branchy_tee.demo.common import OWNERS, enclave_run, free_port, say, step

if TYPE_CHECKING:
    from branchy_tee.gramine.release import ReleaseStatement

# What the demo takes here besides training (2 cores): the enclave's runs over the test split, the
# online part and the timing; measured, for the estimate the demo prints first.
MINUTES_BESIDES_TRAINING = 1


def _minutes(m: float) -> str:
    return f"{m:.0f} minute{'s' if round(m) > 1 else ''}" if m >= 1 else f"{60 * m:.0f} seconds"


class Demo:
    """The demo's state, one method per act. Every party's files are in its own folder of ``d``."""

    def __init__(self, out: str | os.PathLike, quick: bool, data_dir, epochs: int | None, cache_dir: str | os.PathLike):
        from branchy_tee.train.cache import cache_entry, is_cached, recipe

        self.t_start = time.time()
        self.d = Path(out)
        if self.d.exists() and any(self.d.iterdir()):
            raise BranchyError(f"{self.d} already exists and is not empty; remove it or choose another --out")
        for sub in ("mo", *OWNERS, "io", "brokers"):
            (self.d / sub).mkdir(parents=True, exist_ok=True)
        self.quick, self.data_dir, self.cache_dir = quick, data_dir, cache_dir
        self.spec = recipe(quick, data_dir, epochs)
        self.dataset = self.spec["dataset"]
        self.entry = cache_entry(cache_dir, self.spec)
        self.cached = is_cached(self.entry, self.spec)
        if self.dataset == "synthetic" and not quick:
            say(
                "NOTICE: Fashion-MNIST was not found (install the Debian package dataset-fashion-mnist, or pass "
                "--data-dir);\n"
                "        the demo uses the synthetic data set instead. The flow is the same; the figures are not "
                "comparable."
            )
        # The simulated provider's dev key lives under XDG_CONFIG_HOME: the demo's stays in the demo folder.
        self.env = dict(os.environ, XDG_CONFIG_HOME=str((self.d / "config").resolve()), OMP_NUM_THREADS="2")
        self.summary: dict = {"dataset": self.dataset}

    def announce_duration(self) -> None:
        rest = 0.5 if self.quick else MINUTES_BESIDES_TRAINING
        if self.cached:
            say(f"branchy-tee demo: about {_minutes(rest)} on a 2-core machine (the model is cached: {self.entry})")
        else:
            train = self.spec["minutes"]
            say(
                f"branchy-tee demo: about {_minutes(rest + train)} on a 2-core machine, {_minutes(train)} of it "
                f"training the model\n    (once: it is cached in {self.entry} for later demos and `branchy-tee bench`)"
            )

    # ------------------------------------------------------------------ model owner
    def train_and_seal(self) -> None:
        from branchy_tee.core.fileio import write_key_file
        from branchy_tee.core.keys import generate_key, key_id
        from branchy_tee.evaluate.exits import evaluate_run
        from branchy_tee.evaluate.plots import plot_accuracy_vs_cost
        from branchy_tee.models.rundir import read_model_card
        from branchy_tee.seal.bundle import seal_run
        from branchy_tee.train.cache import cached_model, describe

        s = self.spec
        step(
            1,
            "model owner",
            f"{'take the cached' if self.cached else 'train'} {describe(s)} on {self.dataset} "
            f"({s['epochs']} epoch(s)), calibrated to a 1-point accuracy budget; evaluate on the test split, seal",
        )
        cached = cached_model(self.cache_dir, s, self.data_dir, log=lambda msg: say(f"    {msg}"))
        self.run_dir = self.d / "mo" / "run"
        shutil.copytree(cached, self.run_dir)  # the model owner's folder holds everything it sealed
        self.report = evaluate_run(
            self.run_dir,
            data_dir=self.data_dir,
            max_batches=1 if self.quick else None,
            latency_reps=3 if self.quick else 20,
        )
        self.summary["files"] = {
            "accuracy_plot": str(plot_accuracy_vs_cost(self.report, self.d / "accuracy_vs_cost.png"))
        }
        self.mo_key = generate_key()
        write_key_file(self.d / "mo" / "model.key", self.mo_key)
        self.card = read_model_card(self.run_dir)
        data = self.card.data
        self.synthetic = data.synthetic if data and self.dataset == "synthetic" else {}  # the model's own data
        header = seal_run(self.run_dir, self.mo_key, self.d / "model.btee", version=1)
        say(f"    sealed {self.d / 'model.btee'}: {header.num_stages} stage graphs, model key id {key_id(self.mo_key)}")

    # ------------------------------------------------------------------ whom the enclave trusts
    def trust(self) -> None:
        from branchy_tee.tee.attest.identity import create_identity, identity_hex

        step(2, "everyone", "identities, the enclave build, the model owner's signed release, the brokers' policies")
        self.ids = {}
        for who in ("mo", *OWNERS):
            key = create_identity(self.d / who / "identity.pem")
            self.ids[who] = (key, identity_hex(key))
            say(f"    {who}: identity {self.ids[who][1]} ({who}/identity.pem)")
        self.mo_port = free_port()
        self.release = self._build_and_release("enclave", serve=False)
        r = self.release
        self.summary["release"] = {
            "mrenclave": r.mrenclave,
            "bundle_id": r.bundle_id,
            "model_version": r.model_version,
            "model_owner": r.model_owner,
            "model_broker_identity": r.model_broker_identity,
        }

    def _build_and_release(self, name: str, serve: bool, enclave_size: str | None = None) -> ReleaseStatement:
        """Host: build; model owner: sign the release; owners: policies from it (policy files per build)."""
        from branchy_tee.gramine.build import BuildOptions, build
        from branchy_tee.gramine.release import write_policy_from_release, write_release

        mo_url = f"http://127.0.0.1:{self.mo_port}"
        built = build(
            BuildOptions(
                bundle=str(self.d / "model.btee"),
                out=str(self.d / name),
                attest=EvidenceProvider.SIMULATED,
                model_broker=mo_url,
                model_broker_identity=self.ids["mo"][1],
                serve=serve,
                io_dirs=[str(self.d / "io")],
                threads=2,
                enclave_size=enclave_size,
                allow_full_model=True,  # the demo compares early exit with the full model
            )
        )
        self.enclave_size = built["enclave_size"]
        say(
            f"    host: built {name}/ ({'serve' if serve else 'predict'}) for bundle {built['bundle_id'][:12]}...; "
            "measured: "
            f"model broker {mo_url} and its identity, the bundle, minimum model version {built['min_model_version']}; "
            f"sgx.enclave_size {built['enclave_size']}"
        )
        release, _ = write_release(
            self.d / name, self.ids["mo"][0], self.d / "mo" / f"release-{name}.json", self.mo_key
        )
        say(
            f"    model owner: reproduces the build, signs mo/release-{name}.json (MRENCLAVE "
            f"{release.mrenclave[:16]}..., "
            "simulated)"
        )
        mo_id = self.ids["mo"][1]
        write_policy_from_release(
            self.d / "mo" / f"release-{name}.json",
            mo_id,
            self.d / "mo" / f"policy-{name}.toml",
            allowed_data_owners=[self.ids[w][1] for w in OWNERS],
            consent=["simulated", "full-model"],
        )
        for who in OWNERS:
            write_policy_from_release(
                self.d / "mo" / f"release-{name}.json",
                mo_id,
                self.d / who / f"policy-{name}.toml",
                consent=["simulated", "full-model"],
            )
        say(
            "    data owners A and B verify it under the model owner's identity and write their policies from it; the "
            "model owner's policy allows exactly A and B"
        )
        return release

    # ------------------------------------------------------------------ data owners' requests
    def encrypt(self) -> None:
        from branchy_tee.client.envelopes import seal_request
        from branchy_tee.core.fileio import atomic_write_bytes, write_key_file
        from branchy_tee.core.keys import generate_key, key_id
        from branchy_tee.data import load_dataset
        from branchy_tee.data.preprocess import tensor_to_inputs

        step(3, "data owners A and B", "each encrypts its half of the test images with its own key")
        self.test = load_dataset(self.dataset, "test", self.data_dir, synthetic=self.synthetic or None)
        n = 64 if self.quick else len(self.test)
        self.halves = {"do-a": slice(0, n // 2), "do-b": slice(n // 2, n)}
        self.keys, self.truth = {}, {}
        for who, sl in self.halves.items():
            self.keys[who] = generate_key()
            write_key_file(self.d / who / "data.key", self.keys[who])
            x = tensor_to_inputs(self.test.images[sl], self.card.preprocessing, f"{who} images")
            self.truth[who] = self.test.labels[sl]
            atomic_write_bytes(
                self.d / "io" / f"{who}-request.enc", seal_request(x, self.keys[who], f"{who}-request-1")
            )
            say(
                f"    data owner {who[-1].upper()}: {len(x)} images -> io/{who}-request.enc (key id "
                f"{key_id(self.keys[who])})"
            )

    # ------------------------------------------------------------------ brokers and the enclave
    def start_brokers(self, build: str) -> list:
        from branchy_tee.broker.server import start_broker
        from branchy_tee.core.keys import key_id

        handles, self.urls = [], {}
        for who in ("mo", *OWNERS):
            key = self.mo_key if who == "mo" else self.keys[who]
            handles.append(
                start_broker(
                    {key_id(key): key},
                    self.d / who / f"policy-{build}.toml",
                    port=self.mo_port if who == "mo" else 0,
                    identity=self.ids[who][0],
                    audit_log=self.d / "brokers" / f"{who}-audit.jsonl",
                )
            )
            self.urls[who] = handles[-1].url
        return handles

    def _predict(self, tag: str, inputs: dict[str, Path], *extra: str, quiet: bool = False) -> dict:
        """The host's command: the enclave in d/enclave runs predict (natively: no SGX here)."""
        cmd = enclave_run(self.d / "enclave", "predict", "--bundle", str(self.d / "model.btee"))
        for who, req in inputs.items():
            result = self.d / "io" / f"{who}-result{tag}.enc"
            cmd += ["--input", str(req), "--output", str(result), "--data-broker", self.urls[who]]
        stats_file = self.d / "io" / f"stats{tag}.json"
        cmd += [
            "--stats-json",
            str(stats_file),
            "--mprofile",
            str(self.d / "io" / f"mprofile{tag or '-staged'}"),
            *extra,
        ]
        with subprocess.Popen(cmd, env=self.env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True) as proc:
            assert proc.stderr is not None
            for line in proc.stderr:
                if not quiet:
                    say(f"    | {line.rstrip()}")
        if proc.returncode != 0:
            raise BranchyError(f"the enclave runtime failed ({tag or 'early exit'}); see its log above")
        return json.loads(stats_file.read_text())

    def enclave_runs(self) -> None:
        step(
            4,
            "key brokers",
            "the model owner and each data owner start a key broker on loopback, with their identities",
        )
        say(
            "    ATTESTATION IS SIMULATED here (no SGX on this machine): evidence is signed by a local development "
            "key and\n"
            "    the brokers accept it only because their policies say allow_simulation = true. Never do this in "
            "production."
        )
        handles = self.start_brokers("enclave")
        try:
            step(
                5,
                "enclave (native backend)",
                "attest to the three brokers, accept only releases signed by the identities "
                "it trusts, answer both requests with early exit, loading stages on demand",
            )
            requests = {who: self.d / "io" / f"{who}-request.enc" for who in OWNERS}
            self.stats = self._predict("", requests)
            say("    ... and once more with the full model, for comparison")
            self.full = self._predict("-full", requests, "--full-model", quiet=True)
            self.staged_loading()
        finally:
            for h in handles:
                h.stop()
            say("    key brokers stopped")

    # ------------------------------------------------------------------ data owners read their results
    def decrypt(self) -> None:
        import torch

        from branchy_tee.client.envelopes import open_result
        from branchy_tee.core.errors import IntegrityError
        from branchy_tee.core.fileio import atomic_write_text
        from branchy_tee.tee.sealed.envelope import request_digest

        step(
            7,
            "data owners A and B",
            "each decrypts its own results, bound to its request, and sees which model answered",
        )
        self.per_owner = {}
        for who in OWNERS:
            mine = request_digest((self.d / "io" / f"{who}-request.enc").read_bytes())
            header, records = open_result(
                (self.d / "io" / f"{who}-result.enc").read_bytes(), self.keys[who], f"{who}-result.enc", mine
            )
            model = header.model
            if model.bundle_id != self.release.bundle_id:
                raise BranchyError(f"{who}: the result names bundle {model.bundle_id}, not the released one")
            acc = float((torch.tensor([r["label"] for r in records]) == self.truth[who]).float().mean())
            budget_file = f"{who}-result-budget.enc"
            budgeted = open_result((self.d / "io" / budget_file).read_bytes(), self.keys[who], budget_file, mine)[1]
            lines = ["index\tlabel\tclass_name\tconfidence\texit"]
            lines += [
                f"{r['index']}\t{r['label']}\t{r['class_name']}\t{r['confidence']:.4f}\t{r['exit']}" for r in records
            ]
            atomic_write_text(self.d / who / "result.txt", "\n".join(lines) + "\n", mode=0o600)
            other = "do-b" if who == "do-a" else "do-a"
            try:
                open_result(
                    (self.d / "io" / f"{other}-result.enc").read_bytes(), self.keys[who], f"{other}-result.enc", mine
                )
                isolated = False
            except IntegrityError:
                isolated = True
            self.per_owner[who] = {
                "samples": len(records),
                "accuracy": acc,
                "result_txt": str(self.d / who / "result.txt"),
                "cannot_read_other_owner": isolated,
                "same_answers_under_budget": budgeted == records,
                "answered_by": model.to_json(),
                "records": records,
            }
            say(
                f"    data owner {who[-1].upper()}: {len(records)} answers from bundle {model.bundle_id[:12]}... "
                f"v{model.model_version}, accuracy {100 * acc:.2f}% -> {who}/result.txt; opening {other}'s result "
                f"with its key: {'refused, as it must be' if isolated else 'SUCCEEDED (bug!)'}"
            )

    # ------------------------------------------------------------------ staged loading
    def staged_loading(self) -> None:
        """Data owner A's small request of easy images (they leave at exit 0): only stage 0 is ever
        resident. Then both requests under a memory budget below the model's weights."""
        import torch

        from branchy_tee.client.envelopes import seal_request
        from branchy_tee.core.fileio import atomic_write_bytes
        from branchy_tee.data.preprocess import tensor_to_inputs
        from branchy_tee.evaluate.exits import collect_log_probs, decide, stage_graphs

        step(6, "enclave", "staged loading: easy images need only the first stage; a memory budget below the weights")
        x = tensor_to_inputs(self.test.images[self.halves["do-a"]], self.card.preprocessing, "images")
        candidates = torch.utils.data.TensorDataset(x[:512], torch.zeros(len(x[:512]), dtype=torch.long))
        log_probs = collect_log_probs(stage_graphs(self.run_dir, show=False), candidates, show=False)[0]
        exits, _ = decide(log_probs, self.card.criterion, self.card.exit_thresholds())  # as the enclave decides
        easy = x[:512][exits == 0][:16]
        if len(easy) == 0:
            say("    (no test image leaves at exit 0 with these thresholds: nothing to show)")
            self.easy = None
        else:
            atomic_write_bytes(self.d / "io" / "do-a-easy.enc", seal_request(easy, self.keys["do-a"], "do-a-easy-1"))
            self.easy = self._predict("-easy", {"do-a": self.d / "io" / "do-a-easy.enc"}, quiet=True)
            say(
                f"    {len(easy)} easy images: stages loaded {self.easy['stages_loaded']}, resident weights "
                f"{self.easy['resident_weights_peak_mib']:.2f} MiB of {self.full['resident_weights_peak_mib']:.2f}, "
                f"peak RSS {self.easy['peak_rss_mib']:.0f} MiB vs {self.full['peak_rss_mib']:.0f} MiB for the full "
                "model"
            )
        from branchy_tee.tee.sealed.bundle import read_header_unverified

        # the smallest budget the store accepts: stage 0 and the largest later stage, never all of them
        w = [s.weight_bytes for s in read_header_unverified(self.d / "model.btee").stages]
        budget = (w[0] + max(w[1:])) / 2**20 + 0.001
        requests = {who: self.d / "io" / f"{who}-request.enc" for who in OWNERS}
        self.budgeted = self._predict(
            "-budget", requests, "--memory-budget", f"{budget + self.stats['activation_allowance_mib']:.3f}", quiet=True
        )
        say(
            f"    --memory-budget with room for {budget:.2f} MiB of weights (the model has {sum(w) / 2**20:.2f} MiB): "
            f"resident at most {self.budgeted['resident_weights_peak_mib']:.2f} MiB, {self.budgeted['evictions']} "
            f"evictions, {self.budgeted['stage_loads']} stage loads"
        )
