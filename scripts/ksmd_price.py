#!/usr/bin/env python3
"""What ksmd costs per second for a given marked set, at given settings (session 12).

Marks N pages of one process MERGEABLE (every page the same bytes, so all merge; or random
bytes, so none does), switches ksmd on at the given pages_to_scan / sleep_millisecs, and after
a settling time reads ksmd's CPU (schedstat) and pages_scanned over a window. Holds
/tmp/ksmplus-ksmd.lock and restores every ksmd setting it changed. Root only.

  sudo scripts/ksmd_price.py                 # the five cases of docs/DESKTOP-BENCH.md
  sudo scripts/ksmd_price.py 4000 same 100 20
"""
import ctypes
import fcntl
import mmap
import os
import subprocess
import sys
import time

KSM = "/sys/kernel/mm/ksm/"
MADV_MERGEABLE = 12
PAGE = 4096
CASES = [(1, "same", 100, 20), (4000, "same", 100, 20), (4000, "same", 20, 20),
         (4000, "same", 100, 100), (4000, "rand", 100, 20)]


def ksm(name, value=None):
    with open(KSM + name, "r+" if value is not None else "r") as f:
        if value is None:
            return int(f.read())
        f.write(str(value))


def child(n, fill, w):
    """The marked process: fills, marks, verifies its pages, says ready, sleeps."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    m = mmap.mmap(-1, n * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    pages = [b"\x5a" * PAGE if fill == "same" else os.urandom(PAGE) for _ in range(n)]
    for i, p in enumerate(pages):
        m[i * PAGE:(i + 1) * PAGE] = p
    assert all(m[i * PAGE:(i + 1) * PAGE] == p for i, p in enumerate(pages)), "pages not held"
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    if libc.madvise(addr, n * PAGE, MADV_MERGEABLE) != 0:
        sys.exit(f"madvise: errno {ctypes.get_errno()}")
    os.write(w, b"r")
    time.sleep(3600)


def ksmd_ns(pid):
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0])


def measure(n, fill, pts, sleep_ms, settle=15, window=30):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        # The child never returns into main(): its errors must not run the parent's cleanup.
        try:
            os.close(r)
            child(n, fill, w)
        except BaseException as e:
            print(f"ksmd_price.py: marked process: {e}", file=sys.stderr)
        finally:
            os._exit(1)
    os.close(w)
    if os.read(r, 1) != b"r":
        sys.exit("the marked process failed")
    kp = int(subprocess.check_output(["pgrep", "-x", "ksmd"]).split()[0])
    try:
        ksm("pages_to_scan", pts)
        ksm("sleep_millisecs", sleep_ms)
        ksm("run", 1)
        time.sleep(settle)
        s0, c0, t0 = ksm("pages_scanned"), ksmd_ns(kp), time.monotonic()
        time.sleep(window)
        s1, c1, t1 = ksm("pages_scanned"), ksmd_ns(kp), time.monotonic()
        with open(f"/proc/{pid}/ksm_stat") as f:
            merging = next(int(l.split()[1]) for l in f if l.startswith("ksm_merging_pages"))
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        ksm("run", 2)  # unmerge what is left, then off
        ksm("run", 0)
    secs = t1 - t0
    pct = (c1 - c0) / 1e9 / secs * 100
    rate = (s1 - s0) / secs
    us = (c1 - c0) / 1e3 / max(s1 - s0, 1)
    print(f"{n:>5} {fill:<4} pages_to_scan {pts:>4} sleep {sleep_ms:>4} ms: ksmd {pct:6.2f} % of a "
          f"core, {rate:7.0f} pages/s, {us:6.2f} us/page, merging {merging}", flush=True)


def main():
    if os.geteuid() != 0:
        sys.exit("ksmd_price.py: needs root (it switches ksmd on)")
    cases = CASES if len(sys.argv) == 1 else [
        (int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))]
    lock = open("/tmp/ksmplus-ksmd.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    saved = {k: ksm(k) for k in ("run", "pages_to_scan", "sleep_millisecs")}
    try:
        for case in cases:
            measure(*case)
    finally:
        for k in ("pages_to_scan", "sleep_millisecs", "run"):
            ksm(k, saved[k])


if __name__ == "__main__":
    main()
