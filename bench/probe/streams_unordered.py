"""Do two streams' GEMV launches overlap, and does the test catch it unordered? (run, then deleted)"""
import sys

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from fxsparse.kernels import sparse_gemv as sg

real = sg._order_streams
for name, fn in (("ordered", real), ("unordered", lambda device: None)):
    sg._order_streams = fn
    n = k = 4096
    xs = [torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    for x in xs:
        x[:, k // 2:] = 0
    ws = [torch.randn(k, n, device="cuda", dtype=torch.bfloat16).t() * 0.02 for _ in range(2)]
    for det in (False, True):
        cfg = sg._pick_config(1, n, k, 2, 4, deterministic=det)
        want = [sg.threshold_gemv(x, w, None, 0.5, config=cfg) for x, w in zip(xs, ws, strict=True)]
        torch.cuda.synchronize()
        streams = [torch.cuda.Stream(), torch.cuda.Stream()]
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for s in streams:
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    torch.cuda._sleep(20_000_000)
            outs = [[], []]
            for _ in range(20):
                for i, s in enumerate(streams):
                    with torch.cuda.stream(s):
                        outs[i].append(sg.threshold_gemv(xs[i], ws[i], None, 0.5, config=cfg))
            torch.cuda.synchronize()
        ev = [e for e in prof.events() if e.device_type.name == "CUDA" and "gemv" in e.name]
        iv = {}
        for e in ev:
            iv.setdefault(getattr(e, "device_resource_id", None) or e.thread, []).append(
                (e.time_range.start, e.time_range.end))
        keys = list(iv)
        over = 0
        if len(keys) == 2:
            a, b = iv[keys[0]], iv[keys[1]]
            over = sum(1 for s0, e0 in a for s1, e1 in b if s0 < e1 and s1 < e0)
        err = max(float((o.float() - want[i].float()).abs().max()) for i in range(2) for o in outs[i])
        print(f"{name} det={det}: {len(ev)} kernels on {len(keys)} streams, overlapping pairs "
              f"{over}, dur {[round(e - s, 1) for s, e in iv[keys[0]][:3]]} us, max err {err:.3g}")
sg._order_streams = lambda device: None
rc = pytest.main(["-q", "-p", "no:cacheprovider", "tests/test_sparse_gemv.py::test_two_streams_gpu"])
print("unordered: pytest rc", rc, "(1 = the test catches the race)")
sys.path.insert(0, "tests")
import test_sparse_gemv as T  # noqa: E402

for prof_on in (False, True):
    for det in (False, True):
        try:
            if prof_on:
                with profile(activities=[ProfilerActivity.CUDA]):
                    T.test_two_streams_gpu(det)
            else:
                T.test_two_streams_gpu(det)
            print("direct", det, "profiler", prof_on, "passed", T.sg is sg, T.sg._order_streams)
        except AssertionError as e:
            print("direct", det, "profiler", prof_on, "FAILED", str(e)[:80])
