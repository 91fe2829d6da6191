#!/usr/bin/env python3
"""Run Smalltalk source files headless in a real Squeak VM (the project's test harness).

The VM is Debian's `squeak-vm`; the image is the 2003 Squeak inside Debian's `scratch`
package, patched once (patch_image.py) so that it files in the script named on its command
line, and cached. The runner prelude (runner-prelude.st) is filed in first: it gives stdout /
stderr, reports syntax errors, runtime errors and undeclared variables without modal
dialogs, and offers `StRunner assert:named:` / `check:do:` / `finish`.

    from run import run_st, unavailable_reason
    if unavailable_reason(): ...skip...
    r = run_st(["client.st", "test.st"], env={"API_PORT": "8080"})
    r.returncode, r.stdout, r.stderr, r.passed, r.failed

Exit codes: 0 ok; 1 tests failed (StRunner finish); 2 runtime error; 3 syntax error or
(strict mode, the default) undeclared variables; 4 missing file; 124 timeout; 127 no VM.

Command line: python smalltalk/harness/run.py [--timeout S] [--lenient] FILE.st...

Environment:
  NSBRIDGE_SQUEAK_VM     path of the squeakvm binary (default /usr/lib/squeak/*/squeakvm)
  NSBRIDGE_SQUEAK_PLUGINS  the VM's plugin folder, for a VM unpacked without root
                         (`apt-get download squeak-vm scratch libpcre3`, `dpkg -x` each; set
                         LD_LIBRARY_PATH=<dir>/lib/x86_64-linux-gnu too)
  NSBRIDGE_SQUEAK_IMAGE  path of the stock Scratch.image (default /usr/share/scratch/Scratch.image)
  NSBRIDGE_HOME          cache root; the patched image goes to $NSBRIDGE_HOME/squeak
                         (default $XDG_CACHE_HOME/nsbridge/squeak or ~/.cache/nsbridge/squeak)
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
PRELUDE = HERE / "runner-prelude.st"
DEFAULT_IMAGE = "/usr/share/scratch/Scratch.image"

EXIT_NAMES = {
    0: "ok",
    1: "tests failed",
    2: "runtime error",
    3: "syntax error or undeclared variable",
    4: "missing file",
    124: "timed out (a modal dialog or an endless loop?)",
    127: "no Squeak VM",
}


@dataclass
class StResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def passed(self) -> int:
        m = re.search(r"^(\d+) passed, (\d+) failed$", self.stdout, re.M)
        return int(m.group(1)) if m else 0

    @property
    def failed(self) -> int:
        m = re.search(r"^(\d+) passed, (\d+) failed$", self.stdout, re.M)
        return int(m.group(2)) if m else 0

    @property
    def failures(self) -> list[str]:
        return [line for line in self.stdout.splitlines() if line.startswith("not ok")]

    def describe(self) -> str:
        what = EXIT_NAMES.get(self.returncode, "exit status %d" % self.returncode)
        return "squeak: %s (rc=%d)\n--- stdout ---\n%s\n--- stderr ---\n%s" % (
            what, self.returncode, self.stdout[-6000:], self.stderr[-6000:])


def find_vm() -> str | None:
    vm = os.environ.get("NSBRIDGE_SQUEAK_VM")
    if vm:
        return vm if os.access(vm, os.X_OK) else None
    for path in sorted(glob.glob("/usr/lib/squeak/*/squeakvm")):
        if os.access(path, os.X_OK):
            return path
    return None


def find_source_image() -> str | None:
    image = os.environ.get("NSBRIDGE_SQUEAK_IMAGE", DEFAULT_IMAGE)
    return image if os.path.isfile(image) else None


def cache_dir() -> Path:
    home = os.environ.get("NSBRIDGE_HOME")
    if home:
        return Path(home) / "squeak"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "nsbridge" / "squeak"


def unavailable_reason() -> str | None:
    """Why Smalltalk cannot run here (None when it can). Tests skip with this text."""
    if find_vm() is None:
        if os.environ.get("NSBRIDGE_SQUEAK_VM"):
            return "NSBRIDGE_SQUEAK_VM=%s is not an executable Squeak VM" % os.environ["NSBRIDGE_SQUEAK_VM"]
        return ("squeak-vm is not installed (no /usr/lib/squeak/*/squeakvm): "
                "apt-get install squeak-vm scratch, or run `make setup`")
    if find_source_image() is None:
        return ("the Squeak image from Debian's scratch package is missing (%s): "
                "apt-get install scratch, or run `make setup`" % os.environ.get("NSBRIDGE_SQUEAK_IMAGE", DEFAULT_IMAGE))
    return None


def _load_patcher():
    spec = importlib.util.spec_from_file_location("nsbridge_patch_image", HERE / "patch_image.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def ensure_image() -> Path:
    """The patched runner image, built from the stock image on first use and cached."""
    src = find_source_image()
    if src is None:
        raise FileNotFoundError(unavailable_reason())
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    image = cache / "runner.image"
    if image.is_file() and image.stat().st_size > 0 and image.stat().st_mtime >= os.stat(src).st_mtime:
        return image
    fd, tmp = tempfile.mkstemp(prefix="runner.", suffix=".image.tmp", dir=str(cache))
    os.close(fd)
    try:
        _load_patcher().patch(src, tmp)
        os.replace(tmp, image)  # atomic: concurrent runs never see a half-written image
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return image


def run_st(files, timeout: float = 60, env: dict | None = None, strict: bool = True) -> StResult:
    """File in the prelude then each file in order, in a fresh headless VM; answer the result.

    strict: undeclared variables after a file make the run fail with exit status 3.
    """
    vm = find_vm()
    if vm is None:
        return StResult(127, "", unavailable_reason() or "no VM")
    image = ensure_image()
    paths = [str(Path(f).resolve()) for f in files]
    fd, status = tempfile.mkstemp(prefix="status.", dir=str(cache_dir()))
    os.close(fd)
    os.unlink(status)
    run_env = dict(os.environ)
    run_env.update(env or {})
    run_env["ST_STATUS_FILE"] = status
    if strict:
        run_env["ST_STRICT"] = "1"
    else:
        run_env.pop("ST_STRICT", None)
    cmd = [vm, "-vm-display-null", "-vm-sound-null"]
    plugins = os.environ.get("NSBRIDGE_SQUEAK_PLUGINS")
    if plugins:
        cmd += ["-plugins", plugins.rstrip("/") + "/"]
    cmd += [str(image), str(PRELUDE), *paths]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=run_env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        rc = 124
        err += b"\nrun.py: timed out after %gs (a modal dialog or an endless loop?)\n" % timeout
    try:
        with open(status) as f:
            code = re.sub(r"\D", "", f.read())
        if code and rc != 124:
            rc = int(code)
    except FileNotFoundError:
        pass
    finally:
        if os.path.exists(status):
            os.unlink(status)
    if rc < 0:  # killed by a signal without writing the status file
        rc = 128 - rc
    return StResult(rc, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))


def main(argv: list[str]) -> int:
    timeout, strict, files = 60.0, True, []
    args = iter(argv)
    for a in args:
        if a == "--timeout":
            timeout = float(next(args))
        elif a == "--lenient":
            strict = False
        else:
            files.append(a)
    if not files:
        print(__doc__, file=sys.stderr)
        return 2
    reason = unavailable_reason()
    if reason:
        print("run.py: " + reason, file=sys.stderr)
        return 127
    r = run_st(files, timeout=timeout, strict=strict)
    sys.stdout.write(r.stdout)
    sys.stderr.write(r.stderr)
    return r.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
