"""``branchy-tee bench``: early exit against the full model, the enclave's memory, sealing and
attestation costs, measured side by side in one run (``run``)."""
