"""Remote attestation: parse and verify Intel SGX/TDX DCAP quotes (see ``quote`` and ``verify``)."""
