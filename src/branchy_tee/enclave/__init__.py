"""Gramine packaging for the enclave runtime: render and sign the manifest (``build``), launch it
under gramine-sgx, gramine-direct or natively (``launch``). Host-side tools, not part of the TCB."""

MANIFEST_NAME = "branchy-tee"
