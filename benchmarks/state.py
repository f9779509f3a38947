"""A GPT-like training checkpoint of a chosen size, for benchmarks and tests.

``gpt_state(total_bytes)`` returns what a nanoGPT-style training loop would
hand to ``torch.save``: the model's ``state_dict`` (with ``lm_head`` tied to the
token embedding), an AdamW ``state_dict`` holding two fp32 moments per
parameter, and the step counter. Parameters plus moments come to about
``total_bytes``. The values are random normals, so nothing compresses and no
backend gets an unfair shortcut.

``tensors_state(n)`` is the other shape: exactly ``n`` tensors of 1 KiB or
less (weights and an optimizer-like state), for per-tensor costs.

``state_nbytes(state)`` counts the tensor bytes a faithful checkpoint has to
store: every storage once, however many tensors share it.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import torch

# How the benchmark and ``ckptstore bench`` count a state's bytes: one place for both.
from ckptstore.benchmeasure import iter_tensors, state_nbytes, unique_storages  # noqa: F401

# Bytes per parameter in an fp32 AdamW checkpoint: the weight plus exp_avg and
# exp_avg_sq. The per-parameter "step" scalars are noise next to this.
_BYTES_PER_PARAM = 3 * 4

_GPT2_VOCAB = 50304  # GPT-2's 50257 rounded up to a multiple of 64, as nanoGPT does
_MAX_LAYERS = 12


def _round_down(x: float, multiple: int) -> int:
    return int(x) // multiple * multiple


def gpt_config(total_bytes: int) -> dict[str, int]:
    """Pick GPT dimensions whose AdamW checkpoint is about ``total_bytes``.

    Aims for a GPT-2-small-like shape (12 layers, ~50k vocabulary), solving for
    the width, then sizes the vocabulary to absorb the remainder so the total
    lands close to the request. Tiny requests (tests) still get a complete,
    valid structure, just somewhat larger than asked.
    """
    n_params = max(1, total_bytes // _BYTES_PER_PARAM)
    layers = _MAX_LAYERS
    # One block holds 12*d^2 + 13*d parameters: qkv (3d^2+3d), attention
    # projection (d^2+d), MLP up (4d^2+4d) and down (4d^2+d), two layernorms (4d).
    ctx = 1024
    a = 12 * layers
    b = _GPT2_VOCAB + ctx + 13 * layers + 2
    width = (-b + math.sqrt(b * b + 4 * a * n_params)) / (2 * a)
    d_model = max(64, 64 * round(width / 64))
    if d_model < 256:
        ctx = 64  # a long position table would dominate a toy model
    per_layer = 12 * d_model * d_model + 13 * d_model
    fixed = ctx * d_model + 2 * d_model  # position embedding + final layernorm
    min_vocab = 64
    layers = (n_params - fixed - min_vocab * d_model) // per_layer
    layers = int(min(_MAX_LAYERS, max(1, layers)))
    vocab = (n_params - fixed - layers * per_layer) / d_model
    vocab = max(min_vocab, _round_down(vocab, 64))
    return {"vocab": vocab, "d_model": d_model, "n_layer": layers, "n_ctx": ctx}


def _model_shapes(cfg: dict[str, int]) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init) for every distinct parameter, in nanoGPT order."""
    d, v = cfg["d_model"], cfg["vocab"]
    shapes: list[tuple[str, tuple[int, ...], str]] = [
        ("transformer.wte.weight", (v, d), "weight"),
        ("transformer.wpe.weight", (cfg["n_ctx"], d), "weight"),
    ]
    for i in range(cfg["n_layer"]):
        p = f"transformer.h.{i}."
        shapes += [
            (p + "ln_1.weight", (d,), "ln"),
            (p + "ln_1.bias", (d,), "bias"),
            (p + "attn.c_attn.weight", (3 * d, d), "weight"),
            (p + "attn.c_attn.bias", (3 * d,), "bias"),
            (p + "attn.c_proj.weight", (d, d), "weight"),
            (p + "attn.c_proj.bias", (d,), "bias"),
            (p + "ln_2.weight", (d,), "ln"),
            (p + "ln_2.bias", (d,), "bias"),
            (p + "mlp.c_fc.weight", (4 * d, d), "weight"),
            (p + "mlp.c_fc.bias", (4 * d,), "bias"),
            (p + "mlp.c_proj.weight", (d, 4 * d), "weight"),
            (p + "mlp.c_proj.bias", (d,), "bias"),
        ]
    shapes += [
        ("transformer.ln_f.weight", (d,), "ln"),
        ("transformer.ln_f.bias", (d,), "bias"),
    ]
    return shapes


def gpt_state(total_bytes: int, seed: int = 0) -> dict[str, Any]:
    """Build an AdamW training checkpoint of about ``total_bytes`` (see module doc).

    Every tensor is filled in place (``normal_``/``square_``) so building the
    state never holds temporaries: a benchmark process's resident size right
    after this call is the state plus the interpreter, nothing more.
    """
    cfg = gpt_config(total_bytes)
    gen = torch.Generator().manual_seed(seed)

    def normal(shape: tuple[int, ...], mean: float, std: float) -> torch.Tensor:
        return torch.empty(shape, dtype=torch.float32).normal_(mean, std, generator=gen)

    init = {"weight": (0.0, 0.02), "bias": (0.0, 0.02), "ln": (1.0, 0.02)}
    model: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, shape, kind in _model_shapes(cfg):
        model[name] = normal(shape, *init[kind])
    # Weight tying as in GPT-2/nanoGPT: the same tensor object under two keys.
    # A faithful checkpoint stores it once and restores the sharing.
    model["lm_head.weight"] = model["transformer.wte.weight"]

    # AdamW groups as nanoGPT configures them: decay for matrices, none for
    # biases and layernorms. Optimizer.state_dict() numbers parameters
    # group by group, so the ids follow that order.
    params = [t for name, t in model.items() if name != "lm_head.weight"]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    step = 1000
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    groups = []
    next_id = 0
    for group_params, weight_decay in ((decay, 0.1), (no_decay, 0.0)):
        ids = list(range(next_id, next_id + len(group_params)))
        next_id += len(group_params)
        for pid, p in zip(ids, group_params):
            opt_state[pid] = {
                "step": torch.tensor(float(step)),
                "exp_avg": normal(p.shape, 0.0, 1e-3),
                "exp_avg_sq": normal(p.shape, 0.0, 1e-3).square_(),
            }
        groups.append(
            {
                "lr": 6e-4,
                "betas": (0.9, 0.95),
                "eps": 1e-8,
                "weight_decay": weight_decay,
                "amsgrad": False,
                "foreach": None,
                "maximize": False,
                "capturable": False,
                "differentiable": False,
                "fused": None,
                "params": ids,
            }
        )
    return {
        "model": model,
        "optimizer": {"state": opt_state, "param_groups": groups},
        "step": step,
    }


# The tensor-count state: every weight and moment is 1 KiB of float32.
TENSOR_BYTES = 1024


def tensors_state(n: int, tensor_bytes: int = TENSOR_BYTES, seed: int = 0) -> dict[str, Any]:
    """A state of exactly ``n`` small tensors, for what a checkpoint costs per tensor.

    ``n // 3`` trained weights ``layers.{i}.weight`` each carry an optimizer
    entry ``{"step": 0-dim float32, "exp_avg": 1 KiB}`` (three tensors a
    parameter, an Adam-like state without its second moment); the ``n % 3``
    tensors left over are frozen weights (more ``layers.{i}.weight``, no
    optimizer state), as in fine-tuning. So there are ``n - 2 * (n // 3)``
    weights and ``n`` tensors in all, and the tensor bytes grow with ``n``
    (``tensors_nbytes``), about 0.68 KiB a tensor.
    """
    trained = n // 3
    numel = tensor_bytes // 4
    gen = torch.Generator().manual_seed(seed)

    def normal(std: float) -> torch.Tensor:
        return torch.empty(numel, dtype=torch.float32).normal_(0.0, std, generator=gen)

    model = OrderedDict((f"layers.{i}.weight", normal(0.02)) for i in range(n - 2 * trained))
    opt_state = {i: {"step": torch.tensor(1000.0), "exp_avg": normal(1e-3)} for i in range(trained)}
    groups = [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
               "params": list(range(trained))}]
    return {"model": model, "optimizer": {"state": opt_state, "param_groups": groups}}


def tensors_nbytes(n: int, tensor_bytes: int = TENSOR_BYTES) -> int:
    """``state_nbytes(tensors_state(n))``, computed without building it."""
    trained = n // 3
    return (n - trained) * (tensor_bytes // 4 * 4) + 4 * trained


def build_state(spec: dict) -> dict[str, Any]:
    """The state a worker spec asks for: ``tensors_state(spec["tensors"],
    spec.get("tensor_bytes"))`` when it names a tensor count, else
    ``gpt_state(spec["size_bytes"])``."""
    if spec.get("tensors") is not None:
        return tensors_state(spec["tensors"], spec.get("tensor_bytes", TENSOR_BYTES), seed=spec.get("seed", 0))
    return gpt_state(spec["size_bytes"], seed=spec.get("seed", 0))


def expected_nbytes(total_bytes: int) -> int:
    """``state_nbytes(gpt_state(total_bytes))``, computed without building it."""
    shapes = _model_shapes(gpt_config(total_bytes))
    n_params = sum(math.prod(shape) for _, shape, _ in shapes)
    # Plus one 4-byte "step" scalar per parameter in the optimizer state.
    return n_params * _BYTES_PER_PARAM + 4 * len(shapes)


def materialize(meta: Any, made: dict | None = None) -> Any:
    """Empty CPU tensors in the structure of ``meta`` (a state built on the meta device);
    tied tensors stay one tensor."""
    made = {} if made is None else made
    if isinstance(meta, torch.Tensor):
        if id(meta) not in made:
            made[id(meta)] = torch.empty(meta.shape, dtype=meta.dtype)
        return made[id(meta)]
    if isinstance(meta, dict):
        return type(meta)((k, materialize(v, made)) for k, v in meta.items())
    if isinstance(meta, (list, tuple)):
        return type(meta)(materialize(v, made) for v in meta)
    return meta
