"""The enclave runtime: batched early exit over a sealed bundle. Imports only torch, numpy,
safetensors, cryptography and the standard library (it is the enclave's trusted computing base)."""
