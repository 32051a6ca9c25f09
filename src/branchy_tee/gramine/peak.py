"""Run the enclave runtime once and report its peak virtual memory. ``enclave build`` starts this
file with the enclave environment's interpreter and the manifest's environment (measure.py), so the
``branchy_tee`` it imports is the enclave environment's copy. Standard library only besides that.

Prints one JSON line: VmPeak and VmHWM (bytes, from /proc/self/status) and the runtime's exit code.
"""

import json
import sys


def run_runtime(argv: list[str]) -> int:
    """The one call into the runtime: ``predict`` with its own command line (keep it this small, so
    that it keeps working whatever the runtime runs inside: torch today, ONNX Runtime next)."""
    from branchy_tee.tee.predict import main

    return main(argv)


def memory_status() -> dict[str, int]:
    status = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmPeak", "VmHWM"):
                status[key] = int(value.split()[0]) * 1024
    return status


if __name__ == "__main__":
    rc = run_runtime(sys.argv[1:])
    print(json.dumps({"exit_code": rc, **memory_status()}), flush=True)
    sys.exit(rc)
