#!/bin/sh
# ensure-data.sh PYTHON: make sure Fashion-MNIST can be found; install Debian's
# dataset-fashion-mnist package when it cannot and apt exists.
PY="$1"
if "$PY" -c "from fashion_cnn.data import find_data_dir; find_data_dir()" 2>/dev/null; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "note: Fashion-MNIST not found and apt-get is unavailable; see README (Data)" >&2
    exit 0
fi
SUDO=""
[ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
echo "Installing dataset-fashion-mnist with apt-get ..."
$SUDO apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
