"""Owner-side export of trained models into the graphs the enclave runs (ONNX, one per stage)."""
