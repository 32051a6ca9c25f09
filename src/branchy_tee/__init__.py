"""branchy-tee: secure early-exit inference for multi-exit CNNs in SGX enclaves (Gramine)."""

__version__ = "0.1.0"
