#!/usr/bin/env bash
# strace runs the enclave's entry script in the run-time file policy test (tests/test_enclave_gramine.py).
# Install it when we are root on a machine with apt; otherwise say how to get it. Never fails: that test
# is skipped, with this reason, when strace is absent.
set -u
command -v strace >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "Installing strace (for the enclave's file policy test)..."
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q strace >/dev/null; then
    apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q strace >/dev/null
  fi
fi
if ! command -v strace >/dev/null 2>&1; then
  echo "note: strace not found; install it with 'sudo apt-get install strace'. The enclave file policy test is skipped." >&2
fi
exit 0
