"""Which lossless codec for checkpoint bytes: ratio and speed on a trained state.

    python -m benchmarks.codecs [--seconds 120] [--threads 2] [--json PATH]

Random initial weights are no test of compression (their bytes are as random as
floats get), so this first trains a small causal transformer language model
with AdamW on a synthetic corpus (a sparse Markov chain over 4,096 tokens, so
there is something to learn) for --seconds on the CPU. Its state then gives
four kinds of tensor bytes: the weights in float32, the same weights cast to
bfloat16, and AdamW's ``exp_avg`` and ``exp_avg_sq`` (float32).

Each candidate compresses each kind as a whole (one frame per tensor, as a
checkpoint would store them) and decompresses it again, checked bit for bit:

- ``zstd-N``: zstandard at level N on the raw bytes;
- ``zstd-N grouped``: the same after byte grouping (byte k of every element
  together, for k in 0..itemsize-1): the exponent bytes of floats, which vary
  little, then end up next to each other;
- ``blosc2 shuffle+zstd-N``, ``blosc2 bitshuffle+zstd-N``: blosc2's own byte or
  bit shuffle filters in front of zstd, ``--threads`` threads;
- ``zipnn``: ZipNN (byte grouping and Huffman coding, IBM), ``--threads`` threads.

It prints stored / logical bytes per kind and compress and decompress speeds
(MB/s of logical bytes). Codecs that are not installed are skipped, with the
pip command that installs them.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any, Callable

import numpy as np
import torch

VOCAB, D_MODEL, LAYERS, HEADS, CTX = 4096, 256, 4, 4, 64


def _corpus(n_tokens: int, seed: int = 0) -> torch.Tensor:
    """A token stream from a sparse Markov chain: each token has 8 likely successors."""
    g = torch.Generator().manual_seed(seed)
    succ = torch.randint(0, VOCAB, (VOCAB, 8), generator=g)
    weights = torch.softmax(torch.randn(VOCAB, 8, generator=g) * 2, dim=1)
    out = torch.empty(n_tokens, dtype=torch.long)
    tok = 0
    picks = torch.multinomial(weights, n_tokens // VOCAB + 2, replacement=True, generator=g)
    used = torch.zeros(VOCAB, dtype=torch.long)
    for i in range(n_tokens):
        out[i] = tok
        tok = int(succ[tok, picks[tok, used[tok] % picks.shape[1]]])
        used[out[i]] += 1
    return out


class _LM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, D_MODEL)
        self.pos = torch.nn.Embedding(CTX, D_MODEL)
        layer = torch.nn.TransformerEncoderLayer(D_MODEL, HEADS, 4 * D_MODEL, dropout=0.0, batch_first=True,
                                                 norm_first=True)
        self.body = torch.nn.TransformerEncoder(layer, LAYERS)
        self.head = torch.nn.Linear(D_MODEL, VOCAB, bias=False)
        self.head.weight = self.emb.weight                       # tied, as GPT-2 does

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = torch.nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        h = self.emb(x) + self.pos(torch.arange(x.shape[1]))
        return self.head(self.body(h, mask=mask, is_causal=True))


def train(seconds: float, log: Callable[[str], None]) -> tuple[torch.nn.Module, torch.optim.AdamW, dict]:
    """Train the model for ``seconds``; return it, its AdamW optimizer and facts (steps, loss, parameters).

    ``benchmarks/space.py`` saves the model and optimizer themselves; ``trained_state`` takes their bytes.
    """
    torch.manual_seed(0)
    model = _LM()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    data = _corpus(200_000)
    g = torch.Generator().manual_seed(1)
    start, steps, loss = time.perf_counter(), 0, float("nan")
    while time.perf_counter() - start < seconds:
        idx = torch.randint(0, len(data) - CTX - 1, (16,), generator=g)
        x = torch.stack([data[i:i + CTX] for i in idx])
        y = torch.stack([data[i + 1:i + CTX + 1] for i in idx])
        out = model(x)
        lossv = torch.nn.functional.cross_entropy(out.reshape(-1, VOCAB), y.reshape(-1))
        opt.zero_grad()
        lossv.backward()
        opt.step()
        steps += 1
        loss = float(lossv)
        if steps % 50 == 0:
            log(f"  step {steps}: loss {loss:.3f} ({time.perf_counter() - start:.0f} s)")
    facts = {"steps": steps, "final_loss": loss, "initial_loss_bound": math.log(VOCAB),
             "parameters": sum(p.numel() for p in model.parameters())}
    return model, opt, facts


def trained_state(seconds: float, log: Callable[[str], None]) -> tuple[dict[str, np.ndarray], dict]:
    """Train for ``seconds``; return {kind: concatenation of that kind's tensors as bytes} and facts."""
    model, opt, facts = train(seconds, log)
    params = [p for p in model.parameters()]
    st = opt.state_dict()["state"]

    def cat(ts: list[torch.Tensor]) -> np.ndarray:
        return torch.cat([t.detach().reshape(-1) for t in ts]).view(torch.uint8).numpy().copy()
    kinds = {
        "weights fp32": cat(params),
        "weights bf16": cat([p.to(torch.bfloat16) for p in params]),
        "exp_avg fp32": cat([st[i]["exp_avg"] for i in range(len(params))]),
        "exp_avg_sq fp32": cat([st[i]["exp_avg_sq"] for i in range(len(params))]),
    }
    return kinds, facts


def _grouped(a: np.ndarray, itemsize: int) -> np.ndarray:
    return a.reshape(-1, itemsize).T.copy().reshape(-1)


def _ungrouped(a: np.ndarray, itemsize: int) -> np.ndarray:
    return a.reshape(itemsize, -1).T.copy().reshape(-1)


def codecs(threads: int) -> tuple[dict[str, Any], list[str]]:
    """{name: factory(itemsize) -> (compress, decompress)} of the installed candidates, and what is missing."""
    out: dict[str, Any] = {}
    missing = []
    try:
        import zstandard as zstd

        for level in (1, 3):
            def zfactory(itemsize, level=level, group=False):
                c = zstd.ZstdCompressor(level=level, threads=threads if threads > 1 else 0)
                d = zstd.ZstdDecompressor()
                if not group:
                    return (lambda a: c.compress(a.data)), (lambda b: np.frombuffer(d.decompress(b), np.uint8))
                return (lambda a: c.compress(_grouped(a, itemsize).data),
                        lambda b: _ungrouped(np.frombuffer(d.decompress(b), np.uint8), itemsize))
            out[f"zstd-{level}"] = zfactory
            out[f"zstd-{level} grouped"] = lambda itemsize, level=level, f=zfactory: f(itemsize, level, True)
    except ImportError:
        missing.append("zstandard")
    try:
        import blosc2

        blosc2.set_nthreads(threads)
        for filt, fname in ((blosc2.Filter.SHUFFLE, "shuffle"), (blosc2.Filter.BITSHUFFLE, "bitshuffle")):
            for level in (1, 5):
                def bfactory(itemsize, filt=filt, level=level):
                    def comp(a):
                        return blosc2.compress2(a.data, typesize=itemsize, clevel=level, filters=[filt],
                                                codec=blosc2.Codec.ZSTD)
                    return comp, (lambda b: np.frombuffer(blosc2.decompress2(b), np.uint8))
                out[f"blosc2 {fname}+zstd-{level}"] = bfactory
    except ImportError:
        missing.append("blosc2")
    try:
        from zipnn import ZipNN

        def znfactory(itemsize):
            z = ZipNN(input_format="byte", bytearray_dtype="bfloat16" if itemsize == 2 else "float32",
                      threads=threads)
            return (lambda a: z.compress(a.tobytes())), (lambda b: np.frombuffer(z.decompress(b), np.uint8))
        out["zipnn"] = znfactory
    except ImportError:
        missing.append("zipnn")
    return out, missing


def measure(kinds: dict[str, np.ndarray], threads: int, log: Callable[[str], None]) -> dict:
    table, missing = codecs(threads)
    results: dict = {}
    for name, factory in table.items():
        results[name] = {}
        for kind, data in kinds.items():
            itemsize = 2 if "bf16" in kind else 4
            comp, decomp = factory(itemsize)
            best_c = best_d = float("inf")
            stored = 0
            for _ in range(3):
                t = time.perf_counter()
                blob = comp(data)
                best_c = min(best_c, time.perf_counter() - t)
                t = time.perf_counter()
                back = decomp(blob)
                best_d = min(best_d, time.perf_counter() - t)
                if not np.array_equal(back, data):
                    raise AssertionError(f"{name} did not give back the bytes of {kind}")
                stored = len(blob)
            results[name][kind] = {"ratio": stored / data.nbytes, "compress_mb_s": data.nbytes / best_c / 1e6,
                                   "decompress_mb_s": data.nbytes / best_d / 1e6}
        log(f"measured {name}")
    return {"results": results, "missing": missing}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=120.0, help="training time on the CPU")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    log(f"training a {LAYERS}-layer, d={D_MODEL} language model for {args.seconds:g} s")
    kinds, facts = trained_state(args.seconds, log)
    log(f"trained {facts['steps']} steps to loss {facts['final_loss']:.3f} (a uniform guess: "
        f"{facts['initial_loss_bound']:.3f}); {facts['parameters']:,} parameters")
    out = measure(kinds, args.threads, log)
    out.update(facts=facts, threads=args.threads, sizes={k: int(v.nbytes) for k, v in kinds.items()})
    names = list(kinds)
    print(f"\nstored / logical bytes (lower is better); compress / decompress MB/s, {args.threads} thread(s)")
    print(f"{'codec':30s}" + "".join(f"{k:>24s}" for k in names))
    for codec, per in out["results"].items():
        print(f"{codec:30s}" + "".join(f"{per[k]['ratio']:>10.3f} {per[k]['compress_mb_s']:>6.0f}/"
                                       f"{per[k]['decompress_mb_s']:<6.0f}" for k in names))
    if out["missing"]:
        print(f"\nnot installed: {', '.join(out['missing'])} (pip install {' '.join(out['missing'])})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
