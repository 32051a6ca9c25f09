"""The key broker every owner runs: it releases its keys only to enclaves its policy accepts."""
