"""Retrieval before and after issue 21 dropped ``retrieval._serial`` (which ran the element-wise
work of each block on one thread by switching ``torch.set_num_threads``): the old module from git
against the current kernel, on synthetic float16 S_ref, interleaved repetitions, median seconds.

    git show cf650e5:reme/inference/retrieval.py > /tmp/old_retrieval.py
    python scripts/bench_drop_serial.py /tmp/old_retrieval.py      # env: M rows, R repetitions, T threads
"""
import importlib.util, sys, time, os, numpy as np, torch
spec = importlib.util.spec_from_file_location("old_retrieval", sys.argv[1])
old = importlib.util.module_from_spec(spec); sys.modules["old_retrieval"] = old; spec.loader.exec_module(old)
import reme.inference.retrieval as new
torch.set_num_threads(int(os.environ.get("T", 2)))
rng = np.random.default_rng(0)
m, d, k, n, c = int(os.environ.get("M", 100000)), 384, 256, 2000, 20
S = rng.standard_normal((m, d), dtype=np.float32); S /= np.linalg.norm(S, axis=1, keepdims=True); S = S.astype(np.float16)
St = rng.standard_normal((k, d), dtype=np.float32); St /= np.linalg.norm(St, axis=1, keepdims=True)
ps, pl = np.arange(m), rng.integers(0, n, m)
A2 = torch.softmax(torch.randn(n, c), 1)
csr_o, csr_n = old.o_ref_csr(ps, pl, m, n), new.o_ref_csr(ps, pl, m, n)
def topk(mod, csr):
    v, i = mod.exact_topk(St, S, 10); return mod.topk_class_scores(v, i, csr, A2, logit_scale=50.0)
cases = {"full softmax A1 (streamed_label_affinity)": lambda mod, csr: mod.streamed_label_affinity(St, S, csr, logit_scale=50.0),
         "top-10 exact (exact_topk + topk_class_scores)": topk}
res = {}
for rep in range(int(os.environ.get("R", 5))):
    for name, f in cases.items():
        for tag, mod, csr in (("old", old, csr_o), ("new", new, csr_n)):
            t = time.perf_counter(); f(mod, csr); res.setdefault((name, tag), []).append(time.perf_counter() - t)
for name in cases:
    o, nw = np.median(res[(name, "old")]), np.median(res[(name, "new")])
    print(f"{name}: old {o:.3f} s, new {nw:.3f} s (new/old {nw / o:.2f}); m={m} k={k} threads={torch.get_num_threads()}")
print("load average:", os.getloadavg())
