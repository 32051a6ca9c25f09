"""Sealed model bundles, encrypted requests and results. The read side is enclave code: it imports
only cryptography, safetensors, torch and the standard library."""
