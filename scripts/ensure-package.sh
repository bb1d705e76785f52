#!/bin/sh
# ensure-package.sh PACKAGE CHECK: install Debian's PACKAGE with apt-get when the shell command
# CHECK fails and apt-get exists (with sudo when not root). Used by the Makefile's set-up.
pkg="$1"; check="$2"
sh -c "$check" >/dev/null 2>&1 && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
    echo "note: $pkg is missing and apt-get is unavailable; install it by hand (see README)" >&2
    exit 0
fi
SUDO=""
[ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
echo "Installing $pkg with apt-get ..."
$SUDO apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$pkg" >/dev/null
