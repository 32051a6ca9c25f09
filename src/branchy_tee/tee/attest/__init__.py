"""The enclave's side of attestation: evidence providers, the key-broker protocol and its client,
Ed25519 identities, RA-TLS certificates, and the few quote fields the enclave reads."""
