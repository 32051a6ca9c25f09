"""The verifier: DCAP quotes checked up to Intel's root (``dcap``: numbered steps), simulated
evidence, the owners' policies, and the enclave's RA-TLS certificate as a data owner checks it."""
