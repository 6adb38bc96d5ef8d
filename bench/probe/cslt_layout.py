"""Dump torch._cslt_compress outputs for structured bf16 inputs (layout reverse-engineering).

Saves, per shape: the dense pruned inputs and the raw compressed int16 words, so the value and
metadata layout can be decoded offline. PYTHONPATH=. python bench/probe/cslt_layout.py $OUT
"""
import sys

import torch

out = {}
torch.manual_seed(0)
pairs = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]])
for m, k in [(32, 64), (64, 128), (128, 256), (256, 512), (96, 192)]:
    for trial in range(4):
        code = torch.randint(0, 6, (m, k // 4))
        keep = torch.zeros(m, k // 4, 4, dtype=torch.bool)
        p = pairs[code]  # [m, k/4, 2]
        keep.scatter_(2, p, True)
        keep = keep.reshape(m, k)
        # value = small integer encoding: trial 0,1 encode row / column-pair (exact in bf16)
        if trial == 0:
            val = torch.arange(m).float()[:, None].expand(m, k) + 1
        elif trial == 1:
            val = (torch.arange(k).float() // 2)[None, :].expand(m, k) + 1
        else:
            val = torch.randn(m, k)
        x = torch.where(keep, val, torch.zeros(())).to(torch.bfloat16).cuda()
        try:
            c = torch._cslt_compress(x)
            words = c.view(torch.int16).cpu()
            # check the sparse mm with identity to make sure this is a usable layout
            eye = torch.eye(k, dtype=torch.bfloat16, device="cuda")
            back = torch._cslt_sparse_mm(c, eye)
            ok = torch.equal(back.cpu(), x.cpu())
        except Exception as e:  # noqa: BLE001
            words, ok = repr(e), False
        out[(m, k, trial)] = dict(x=x.cpu(), code=code, words=words, roundtrip=ok)
        print(m, k, trial, "numel", None if isinstance(words, str) else words.numel(), "roundtrip", ok)
print(torch.__version__, torch.backends.cusparselt.version())
torch.save(out, sys.argv[1] + "/cslt_layout.pt")
