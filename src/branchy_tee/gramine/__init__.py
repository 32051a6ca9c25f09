"""The host's and owners' tooling around Gramine: the enclave's Python environment, the manifest,
its measured size and signature, the launcher, and the release statement the model owner signs.
Never runs inside the enclave."""

MANIFEST_NAME = "branchy-tee"
