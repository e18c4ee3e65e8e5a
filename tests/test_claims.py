"""Claims (`wsi.claims`): exactly one of two processes racing for a stale claim takes it over; claims of
other hosts expire after the timeout, fresh ones do not; a live claim is never taken."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from wsi.claims import claim

ROUNDS = 20


def dead_pid() -> int:
    """The pid of a process of this host that has exited."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def write_claim(d: Path, name: str, **fields) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{name}.claim"
    path.write_text(json.dumps(fields))
    return path


def _contender(d: str, start, hold, out, flock: bool) -> None:
    # A slow filesystem: every claim read takes 20 ms, so both contenders judge the stale claim
    # before either acts on it, the interleaving in which a check-then-act takeover lets both in.
    loads = json.loads

    def slow_loads(*a, **k):
        time.sleep(0.02)
        return loads(*a, **k)

    json.loads = slow_loads
    if not flock:  # a filesystem that refuses file locks: the rename check alone must hold
        import errno
        import fcntl

        def refuse(*a):
            raise OSError(errno.ENOLCK, "no locks available")

        fcntl.flock = refuse
    for r in range(ROUNDS):
        start.wait()
        with claim(d, f"slide{r}.enc") as mine:
            out.put((r, os.getpid(), mine))
            hold.wait()  # both have answered while the winner still holds its claim


@pytest.mark.parametrize("flock", [True, False], ids=["flock", "no-flock"])
def test_two_processes_racing_on_a_stale_claim_exactly_one_wins(tmp_path, flock):
    d = tmp_path / ".claims"
    pid = dead_pid()
    for r in range(ROUNDS):
        write_claim(d, f"slide{r}.enc", host=socket.gethostname(), pid=pid, time=time.time())
    ctx = mp.get_context("fork")
    start, hold, out = ctx.Barrier(2), ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_contender, args=(str(d), start, hold, out, flock)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [out.get(timeout=60) for _ in range(2 * ROUNDS)]
    for p in procs:
        p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs)
    winners = {r: sum(mine for rr, _, mine in got if rr == r) for r in range(ROUNDS)}
    assert winners == {r: 1 for r in range(ROUNDS)}, winners
    assert not list(d.glob("*.claim"))  # each winner released its claim


def test_claim_of_another_host_expires_after_the_timeout(tmp_path):
    d = tmp_path / ".claims"
    old = write_claim(d, "a.enc", host="other-node", pid=os.getpid(), time=time.time() - 7200)
    write_claim(d, "b.enc", host="other-node", pid=os.getpid(), time=time.time() - 60)
    with claim(d, "a.enc", timeout_s=3600) as mine:
        assert mine
        assert json.loads(old.read_text())["host"] == socket.gethostname()  # now ours
    assert not old.exists()
    with claim(d, "b.enc", timeout_s=3600) as mine:  # fresh: its host may still be working on it
        assert not mine
    assert json.loads((d / "b.enc.claim").read_text())["host"] == "other-node"  # left alone
    with claim(d, "b.enc", timeout_s=30) as mine:  # the timeout is the setting's
        assert mine


def test_live_claim_is_never_taken_and_dead_one_is(tmp_path):
    d = tmp_path / ".claims"
    with claim(d, "s.enc") as first:
        assert first
        with claim(d, "s.enc") as second:  # this very process holds it: alive
            assert not second
        assert (d / "s.enc.claim").exists()  # the loser did not remove the holder's claim
    write_claim(d, "t.enc", host=socket.gethostname(), pid=dead_pid(), time=time.time())
    with claim(d, "t.enc") as mine:
        assert mine


def test_unreadable_claim_counts_as_live_until_the_timeout(tmp_path):
    d = tmp_path / ".claims"
    d.mkdir()
    (d / "x.enc.claim").write_text("")  # e.g. left by a process killed between create and write
    with claim(d, "x.enc") as mine:
        assert not mine
    past = time.time() - 7200
    os.utime(d / "x.enc.claim", (past, past))
    with claim(d, "x.enc", timeout_s=3600) as mine:
        assert mine


def test_release_leaves_a_claim_taken_over_by_another_process(tmp_path):
    d = tmp_path / ".claims"
    with claim(d, "s.enc") as mine:
        assert mine
        # another host presumed us dead and took over (our claim expired there)
        write_claim(d, "s.enc", host="other-node", pid=1, time=time.time(), token="theirs")
    assert json.loads((d / "s.enc.claim").read_text())["token"] == "theirs"
