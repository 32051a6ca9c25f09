"""The enclave runtime: batched early exit over a sealed bundle of ONNX stage graphs. Imports only
onnxruntime, numpy, safetensors, cryptography and the standard library (it is the enclave's trusted
computing base)."""
