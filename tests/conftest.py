"Shared pytest fixtures."
import pytest


@pytest.fixture(scope="module")
def one_thread():
    "Tiny models run fastest on one thread, and are not slowed by thread contention on a busy machine (restored afterwards)."
    import torch
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def sigint_default():
    """`preexec_fn` for a child that a test will Ctrl-C: SIGINT back to its default action, as under a terminal. A process
    started in the background by a non-interactive shell (a CI runner's `cmd &`, `nohup`) inherits SIGINT *ignored*, and
    Python then never installs its KeyboardInterrupt handler, so the test's Ctrl-C would do nothing."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# --- real faults: a small full-able file system, and a read-only one ---------------------------------------------------
import os, subprocess, uuid
from pathlib import Path


def _mount(*args) -> str:
    "Run `mount`/`umount`; return its error text ('' on success)."
    r = subprocess.run(list(args), capture_output=True, text=True)
    return "" if r.returncode == 0 else (r.stderr or r.stdout).strip() or f"exit {r.returncode}"


@pytest.fixture
def small_fs(tmp_path):
    """Make a tmpfs of a given size: `small_fs("2m")` returns its mount point (unmounted after the test).
    Skips, saying why, where mounting is not allowed (not root, or a container without CAP_SYS_ADMIN)."""
    mounted = []
    def make(size: str = "4m") -> Path:
        d = tmp_path/f"fs_{uuid.uuid4().hex[:6]}"; d.mkdir()
        if os.geteuid() != 0: pytest.skip("a real full disk needs a tmpfs mount, which needs root")
        if err := _mount("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)): pytest.skip(f"cannot mount a tmpfs here: {err}")
        mounted.append(d); return d
    yield make
    for d in mounted: _mount("umount", "-l", str(d))


def remount_readonly(d: Path, readonly: bool = True):
    "Remount the tmpfs `d` (made by `small_fs`) read-only, or back read-write; skips where remounting is not allowed."
    if err := _mount("mount", "-o", f"remount,{'ro' if readonly else 'rw'}", str(d)): pytest.skip(f"cannot remount {d}: {err}")


@pytest.fixture
def fill_fs():
    "`fill_fs(d, leave=0)`: fill the file system of `d` until only about `leave` bytes are free (a real 'no space left')."
    def fill(d: Path, leave: int = 0) -> Path:
        f = Path(d)/"ballast"
        with open(f, "wb") as fh:
            try:
                while True:
                    free = os.statvfs(d).f_bavail * os.statvfs(d).f_frsize - leave
                    if free <= 0: break
                    fh.write(b"\0" * min(free, 1 << 20)); fh.flush()
            except OSError: pass
        return f
    return fill
