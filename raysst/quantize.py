"""Dynamic int8 for CPU scoring: SmoothQuant-style scales, per-channel int8 weights, full-range activations.

Plain `quantize_dynamic` over all Linear layers flipped 5% of a fine-tuned MiniLM's SST-2 labels (and cost
0.7 points of accuracy): it quantizes each activation tensor with one scale, and BERT's hidden states carry
a few channels far larger than the rest, so the others keep only a few levels. Three changes bring
agreement with fp32 to 99.3% (accuracy +0.23 points) at plain int8's speed (bench/bench_score.py agree):
- SmoothQuant (Xiao et al., 2022): divide each input channel by s and multiply the weight's column by s,
  exact in real numbers, which moves the outliers' range from the activations into the weights
  (s = amax(x)^0.7 / amax(w)^0.3, amax(x) measured on calibration texts), the divisions shared or folded
  away where BERT's layout allows (fold_attention_scales);
- one int8 scale per output channel of the weights rather than one per matrix;
- activations over the full 8 bits: torch's dynamic Linear keeps 7 (reduce_range), which only CPUs
  without VNNI need, where u8 x s8 products can saturate 16-bit sums.
The pooler and classifier stay fp32: they are one 384x384 and one 384x2 matrix, a rounding error in time.
"""

from __future__ import annotations

import warnings
from typing import Iterable

import torch

ALPHA = 0.7  # how much of the activations' range moves to the weights (0.5 flipped 3% of labels, 0.85 as 0.7)
KEEP_FP32 = ("pooler", "classifier")


def cpu_has_vnni() -> bool:
    """Whether fbgemm's int8 kernels sum in 32 bits here (AVX512-VNNI or AVX-VNNI), so full-range activations
    cannot saturate."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


class SmoothedInt8Linear(torch.nn.Module):
    """x -> int8 Linear(x / s), its weight's columns scaled by s beforehand; `divide=False` where x arrives
    already divided (a shared or folded scale); `in_place` divides x itself where nothing else reads it."""

    def __init__(self, linear: torch.nn.Linear, scale: torch.Tensor, full_range: bool, divide: bool = True,
                 in_place: bool = False):
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

        super().__init__()
        weight = linear.weight.detach().float() * scale
        # Symmetric, one scale per output row, as torch's per-channel weight observer would choose.
        w_scale = (weight.abs().amax(1).double() / 127.5).clamp(min=1e-8)
        qweight = torch.quantize_per_channel(weight, w_scale, torch.zeros_like(w_scale, dtype=torch.long), 0,
                                             torch.qint8)
        self.linear = DynamicLinear(linear.in_features, linear.out_features, dtype=torch.qint8)
        self.linear.set_weight_bias(qweight, None if linear.bias is None else linear.bias.detach().float())
        self.inv_scale = (1.0 / scale) if divide else None
        self.full_range, self.in_place = full_range, in_place

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inv_scale is not None:
            x = x.mul_(self.inv_scale) if self.in_place else x * self.inv_scale
        packed = self.linear._packed_params._packed_params
        return torch.ops.quantized.linear_dynamic(x, packed, reduce_range=not self.full_range)


def activation_ranges(model: torch.nn.Module, names: list[str], batches: Iterable[dict]) -> dict:
    """The largest |input| per channel of each named Linear over the calibration batches."""
    amax: dict = {}

    def record(name):
        def hook(_module, args):
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
            amax[name] = torch.maximum(amax[name], x) if name in amax else x
        return hook

    hooks = [model.get_submodule(n).register_forward_pre_hook(record(n)) for n in names]
    try:
        with torch.inference_mode():
            for batch in batches:
                model(**batch)
    finally:
        for h in hooks:
            h.remove()
    return amax


def smoothing_scale(x_max: torch.Tensor, linears: list) -> torch.Tensor:
    """SmoothQuant's per-input-channel s for Linear layers that read the same input."""
    w_max = torch.stack([m.weight.detach().abs().amax(0).float() for m in linears]).amax(0).clamp(min=1e-5)
    return (x_max.clamp(min=1e-5) ** ALPHA / w_max ** (1 - ALPHA)).clamp(1e-2, 1e2)


def divide_first_input(inv_scale: torch.Tensor):
    """A forward pre-hook that divides a module's input (its first argument, or `hidden_states`)."""
    def hook(_module, args, kwargs):
        if args:
            return (args[0] * inv_scale, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * inv_scale}
    return hook


def fold_attention_scales(model: torch.nn.Module, names: list[str], amax: dict, scale: dict) -> set:
    """BERT-layout attention blocks (`...attention.self.{query,key,value}`, `...attention.output.dense`)
    pay for their scales once, or never, rather than once per Linear (each division cost ~4% of int8's
    time): the attention output is a weighted sum of V's rows, so its scale folds into V's output channels;
    Q, K and V read the same input, so one scale, applied before the block, serves all three. Returns the
    Linear layers whose input arrives already divided."""
    divided = set()
    for block in sorted(n[:-len(".self.query")] for n in names if n.endswith(".attention.self.query")):
        q, k, v, out = (f"{block}.self.query", f"{block}.self.key", f"{block}.self.value", f"{block}.output.dense")
        if not {q, k, v, out} <= set(amax):
            continue
        value = model.get_submodule(v)
        with torch.no_grad():
            value.weight.div_(scale[out][:, None])
            value.bias.div_(scale[out])
        shared = smoothing_scale(amax[q], [model.get_submodule(n) for n in (q, k, v)])
        model.get_submodule(f"{block}.self").register_forward_pre_hook(divide_first_input(1.0 / shared),
                                                                       with_kwargs=True)
        scale.update({q: shared, k: shared, v: shared})
        divided |= {q, k, v, out}
    return divided


def quantize_int8(model: torch.nn.Module, calibration: list[dict]) -> torch.nn.Module:
    """The model's Linear layers (all but the head) as smoothed int8 ones, in place. `calibration` holds
    model-input batches of texts like those to score; with none the scales are 1 (plain per-channel int8)."""
    names = [n for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and not any(k in n for k in KEEP_FP32)]
    amax = activation_ranges(model, names, calibration)
    scale = {n: smoothing_scale(amax[n], [model.get_submodule(n)]) for n in amax}
    divided = fold_attention_scales(model, names, amax, scale)
    full_range = cpu_has_vnni()
    with warnings.catch_warnings():
        # torch points eager quantization users to torchao, which this project does not depend on; the
        # kernels still work, and the warnings would repeat in every actor's log.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", "torch.quantize_per_tensor", UserWarning)
        for name in names:
            linear = model.get_submodule(name)
            # A BERT feed-forward output reads the intermediate activation, which nothing else reads: dividing
            # it in place saves allocating one of the largest tensors (about 4% of int8's time).
            ffn_output = name.endswith(".output.dense") and name[:-len("output.dense")] + "intermediate.dense" in names
            layer = SmoothedInt8Linear(linear, scale.get(name, torch.ones(linear.in_features)), full_range,
                                       divide=name in scale and name not in divided, in_place=ffn_output)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
    return model
