"""``branchy-tee demo``: every party of a secure early-exit deployment, played on this machine.

1. The model owner trains a multi-exit model on Fashion-MNIST (the showcase model of
   ``branchy_tee.train.cache``, a narrow MobileNet V1 whose first exit costs 7 % of its FLOPs; trained
   once and cached, shared with ``branchy-tee bench``), calibrated to a 1-point accuracy budget,
   evaluates it on the test split and seals it.
2. Every owner makes its Ed25519 identity; the host builds the enclave for the bundle, measuring the
   model broker's address and identity and the bundle; the model owner (who would reproduce the build)
   signs a release statement; each data owner writes its broker's policy from that statement, and the
   model owner its own, allowing data owners A and B.
3. Each data owner encrypts its half of the test images with its own key.
4. Three key brokers start on loopback, each with its owner's identity. Attestation is SIMULATED
   (there is no SGX here), and every party says so loudly.
5. The enclave (``enclave run --backend native``: the runtime with the manifest's measured settings, in
   a separate process) attests to each broker, accepts only releases signed by the identities it
   trusts, and answers both requests with batched early exit and on-demand stage loading; once more
   with the full model for comparison.
6. Each data owner decrypts its own results, bound to its request and naming the model that answered;
   neither can read the other's.
7. Staged loading at work: a small request of easy images is answered with only the first stage
   resident, and the whole test set runs under a memory budget smaller than the model's weights.
8. Online: the enclave serves (RA-TLS); both data owners query it at once through the client, which
   checks the enclave's attestation first; early exit and the full model, one request at a time.
"""

from __future__ import annotations

import os

from branchy_tee.demo.batch import Demo
from branchy_tee.demo.online import online
from branchy_tee.demo.summary import summarize
from branchy_tee.train.cache import DEFAULT_CACHE


def run_demo(
    out: str | os.PathLike = "runs/demo",
    quick: bool = False,
    data_dir=None,
    epochs: int | None = None,
    cache_dir: str | os.PathLike = DEFAULT_CACHE,
) -> dict:
    """Run the whole flow in ``out`` (which must not exist or be empty); return the summary."""
    demo = Demo(out, quick, data_dir, epochs, cache_dir)
    demo.announce_duration()
    demo.train_and_seal()
    demo.trust()
    demo.encrypt()
    demo.enclave_runs()
    demo.decrypt()
    online(demo)
    return summarize(demo)
