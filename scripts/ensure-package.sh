#!/bin/sh
# ensure-package.sh COMMAND PACKAGE: install a Debian package when COMMAND is missing and apt exists.
cmd="$1"; pkg="$2"
command -v "$cmd" >/dev/null 2>&1 && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
    echo "note: $cmd not found and apt-get is unavailable; install $pkg by hand" >&2
    exit 0
fi
SUDO=""
[ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
echo "Installing $pkg with apt-get ..."
$SUDO apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$pkg" >/dev/null
