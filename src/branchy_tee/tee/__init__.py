"""The enclave: everything ``predict`` and ``serve`` run, and nothing else. ``enclave build`` copies
this folder and ``core/`` into the enclave's environment, whose every file MRENCLAVE measures. It
imports only onnxruntime, numpy, safetensors, cryptography and the standard library."""
