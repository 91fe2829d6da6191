#!/bin/sh
# st-run.sh [--timeout S] [--lenient] FILE.st...  -- file each chunk-format file in, in order,
# in a headless Squeak (Debian squeak-vm + a cached, patched copy of scratch's Scratch.image),
# then exit. Exit status: 0 ok; 1 tests failed; 2 runtime error; 3 syntax error / undeclared
# variable; 4 missing file; 124 timeout; 127 no VM. See run.py.
HERE=$(cd "$(dirname "$0")" && pwd)
exec "${PYTHON:-python3}" "$HERE/run.py" "$@"
