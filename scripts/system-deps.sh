#!/bin/sh
# Installs the Debian packages the project uses, when they are missing and we can.
set -u
want=""
[ -e /usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 ] || [ -e /usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0 ] || want="$want libopenblas0-pthread"
ls /usr/lib/squeak/*/squeakvm >/dev/null 2>&1 || want="$want squeak-vm"
[ -e /usr/share/scratch/Scratch.image ] || want="$want scratch"
command -v chromium >/dev/null 2>&1 || want="$want chromium"  # the viewer's browser tests (tests/test_viz.py)
[ -z "$want" ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
    echo "system-deps: no apt-get; missing:$want (mlx runs slower without OpenBLAS; Squeak and browser tests skip)"
    exit 0
fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo -n"
echo "system-deps: installing$want"
$SUDO apt-get update -qq >/dev/null && \
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $want >/dev/null \
    || echo "system-deps: could not install$want (continuing; see README)"
exit 0
