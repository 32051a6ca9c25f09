"""What every party's code shares: errors, strict JSON, atomic files, the command line's
conventions, keys and key ids. Standard library and cryptography only; measured with the enclave."""
