#!/usr/bin/env bash
# Fashion-MNIST comes from the Debian package `dataset-fashion-mnist` (gzipped IDX files).
# Install it when we are root on a machine with apt; otherwise say how to get it. Never fails:
# the code falls back to a clear notice (demo) or skips (tests) when the data is absent.
set -u
dir=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
[ -f "$dir/train-images-idx3-ubyte.gz" ] && [ -f "$dir/t10k-labels-idx1-ubyte.gz" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "Installing Fashion-MNIST (Debian package dataset-fashion-mnist)..."
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null; then
    apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null
  fi
fi
if [ ! -f "$dir/train-images-idx3-ubyte.gz" ]; then
  echo "note: Fashion-MNIST not found in $dir." >&2
  echo "      Install it with 'sudo apt-get install dataset-fashion-mnist' (Debian/Ubuntu), or put the four" >&2
  echo "      *-ubyte.gz files there (or set FASHION_MNIST_DIR). Tests that need it are skipped." >&2
fi
exit 0
