"""Setup order under torchrun: rank 0 converts / tokenizes first while the other ranks wait on the rendezvous
store, not in a collective, so a slow rank 0 cannot trip the process group's timeout (a barrier does: the
control case), and a rank 0 failure reaches the others at once as a clear error."""
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastchat_ft.engine import distributed as dist_mod

pytestmark = pytest.mark.usefixtures("gloo_on_cpu")  # gloo on CPU, also on a GPU machine

COLLECTIVE_TIMEOUT_S, SLOW_S = 3, 6  # timeout: margin for start-up skew between the two processes


def _worker(rank, store, out, how):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    order = []

    def work():
        if rank == 0:
            time.sleep(SLOW_S if how != "fail" else 0.5)  # a large dataset being tokenized
            if how == "fail":
                raise ValueError("dataset file is broken")
        order.append((rank, time.monotonic()))
        return rank * 10

    try:
        if how == "barrier":  # the old way: rank 1 sits in a collective while rank 0 works
            if rank:
                dist.barrier()
            result = work()
            if not rank:
                dist.barrier()
        else:
            result = dist_mod.rank_zero_first(work)
        t = torch.tensor([float(result)])
        dist.all_reduce(t)  # the group is still healthy afterwards
        message = f"ok {t.item()} {order[0][1]}"
    except Exception as e:  # noqa: BLE001 - the test reads the error text
        message = f"error {type(e).__name__}: {e}"
    with open(f"{out}.{rank}", "w") as f:
        f.write(message)
    dist_mod.shutdown(failed=not message.startswith("ok"))


def _run(tmp_path, how) -> list[str]:
    out = str(tmp_path / "out")
    mp.spawn(_worker, args=(str(tmp_path / "store"), out, how), nprocs=2, join=True)
    return [open(f"{out}.{r}").read() for r in (0, 1)]


def test_slow_rank_zero_does_not_trip_the_collective_timeout(tmp_path):
    r0, r1 = _run(tmp_path, "store")
    assert r0.startswith("ok 10.0") and r1.startswith("ok 10.0"), (r0, r1)
    assert float(r1.split()[2]) >= float(r0.split()[2])  # rank 1 worked only after rank 0 had finished


def test_barrier_control_times_out(tmp_path):
    """The check above can fail: the same slow rank 0 behind a barrier makes rank 1 time out."""
    _, r1 = _run(tmp_path, "barrier")
    assert r1.startswith("error"), r1


def test_rank_zero_failure_reaches_the_other_ranks(tmp_path):
    r0, r1 = _run(tmp_path, "fail")
    assert r0.startswith("error ValueError")
    assert "rank 0 failed during setup" in r1 and "dataset file is broken" in r1, r1


def test_deadline_is_a_clear_error(tmp_path):
    out = str(tmp_path / "out")
    mp.spawn(_deadline_worker, args=(str(tmp_path / "store"), out), nprocs=2, join=True)
    r1 = open(f"{out}.1").read()
    assert "waited 1 s for rank 0" in r1 and "FASTCHAT_FT_SETUP_TIMEOUT" in r1, r1


def _deadline_worker(rank, store, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))
    try:
        dist_mod.rank_zero_first(lambda: time.sleep(3 if rank == 0 else 0), timeout_s=1.0)
        message = "ok"
    except Exception as e:  # noqa: BLE001
        message = f"error {e}"
    with open(f"{out}.{rank}", "w") as f:
        f.write(message)
    dist_mod.shutdown(failed=True)
