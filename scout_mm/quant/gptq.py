"""GPTQ (Frantar et al., 2022): quantize a weight column by column along its input dim, pushing each column's
rounding error onto the columns not yet quantized through the inverse Hessian ``H = sum x x^T`` of the
layer's calibration inputs, so the layer's OUTPUT error on those inputs is what gets minimised.

By default the columns go in order of decreasing Hessian diagonal ("act order"), with each group's scale and
zero point fixed beforehand by the round-to-nearest rule (:func:`scout_mm.quant.format.group_params`) on the
weights as given ("static groups"), so the stored format is identical to RTN's: the inputs with the most energy,
LLM activations' outlier channels first among them, are rounded while the most columns remain to absorb their
error. On synthetic LLM-like inputs with 8 outlier channels (x20) this halves the held-out output error of
natural-order GPTQ (0.24 -> 0.09 of RTN's at K=1024, 4K rows), and gains 3-5% without outliers
(``bench/results/int4_accuracy_tiny.md``). ``act_order=False`` is the reference implementation's default:
natural order, each group's parameters chosen from the already-updated weights when its first column is reached.

With fewer calibration rows than inputs (``rows < K``) the Hessian has rank at most ``rows``, and GPTQ fits the
rounding error to those rows at the expense of every input direction they do not span: on held-out inputs it
can do worse than round-to-nearest. The damping therefore grows as ``K / rows`` below ``rows = K`` (a smooth
step towards RTN, which is GPTQ with infinite damping), and callers round a matrix with far fewer rows to nearest
instead (``QuantConfig.gptq_min_rows_ratio``; measurements in the README's Int4 section).
"""

from __future__ import annotations

import torch

from scout_mm.quant.format import _packed, check_weight, codes_for, group_params

BLOCK = 128  # columns updated together (lazy batch updates); a multiple of every allowed group size


class Hessian:
    """Running ``sum x x^T`` over calibration rows of one layer input (fp32, on the rows' device)."""

    def __init__(self, dim: int, device):
        self.matrix = torch.zeros(dim, dim, dtype=torch.float32, device=device)
        self.rows = 0

    def add(self, rows: torch.Tensor) -> None:  # (n, dim)
        rows = rows.reshape(-1, rows.shape[-1]).float()
        self.matrix.addmm_(rows.T, rows)
        self.rows += rows.shape[0]


def _inverse_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1, with damping raised until H is positive definite."""
    diag = torch.arange(hessian.shape[0], device=hessian.device)
    mean = hessian.diagonal().mean().clamp(min=1e-12)
    for attempt in range(6):
        h = hessian.clone()
        h[diag, diag] += damp * (10**attempt) * mean
        factor, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
    raise ValueError(
        "GPTQ: the Hessian stayed singular after damping; check the calibration activations, use more calibration "
        "data, or --method rtn"
    )


def quantize_gptq(
    weight: torch.Tensor,  # (K, N): x @ weight, as the packed layout
    hessian: Hessian,
    group_size: int,
    symmetric: bool = True,
    scale_dtype: torch.dtype = torch.bfloat16,
    damp: float = 0.01,
    act_order: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GPTQ-quantize one weight -> (qweight, scales, zeros or None) in the packed layout.

    ``damp``: fraction of the mean Hessian diagonal added to its diagonal, times ``K / rows`` when the Hessian
    has fewer calibration rows than ``K`` inputs.

    ``act_order``: the columns are quantized in order of decreasing Hessian diagonal (the inputs that carry the
    most energy first, so the most columns are left to absorb their rounding error), with every group's scale
    and zero point fixed beforehand from the weights as given ("static groups": the parameters round-to-nearest
    picks, except that inputs never active in calibration count as 0), so the stored layout is unchanged.
    Without it: natural order, each group's parameters chosen from the already-updated weights when its first
    column is reached (the reference implementation's default)."""
    check_weight(weight, group_size)
    size_k, size_n = weight.shape
    device = hessian.matrix.device
    w = weight.to(device=device, dtype=torch.float32).T.contiguous()  # (N, K): rows are output channels
    h = hessian.matrix.clone()
    if not torch.isfinite(h).all():
        raise ValueError(
            f"GPTQ: the calibration Hessian of a ({size_k}, {size_n}) weight is not finite (inf / NaN activations "
            f"in {hessian.rows} calibration rows); check the calibration inputs, or use --method rtn"
        )
    dead = h.diagonal() == 0  # inputs never active: their weights cannot matter, drop them
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    n_groups = size_k // group_size
    if act_order:
        scales, zeros = group_params(w.view(size_n, n_groups, group_size), symmetric, scale_dtype)
        order = torch.argsort(h.diagonal(), descending=True, stable=True)
        w, h = w[:, order], h[order][:, order]
    else:
        scales = torch.empty(size_n, n_groups, device=device)
        zeros = torch.empty(size_n, n_groups, device=device)
        order = torch.arange(size_k, device=device)
    h_inv = _inverse_cholesky(h, damp * max(1.0, size_k / max(hessian.rows, 1)))
    columns = order.tolist()  # the weight column quantized at each step
    codes = torch.empty(size_n, size_k, device=device)
    for start in range(0, size_k, BLOCK):
        end = min(start + BLOCK, size_k)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        h_inv_block = h_inv[start:end, start:end]
        for i in range(end - start):
            col = columns[start + i]
            g = col // group_size
            if not act_order and col % group_size == 0:
                scales[:, g], zeros[:, g] = group_params(block[:, i : i + group_size], symmetric, scale_dtype)
            scale, zero = scales[:, g], zeros[:, g]
            column = block[:, i]
            q = codes_for(column, scale, zero)
            codes[:, col] = q
            err = (column - (q - zero) * scale) / h_inv_block[i, i]
            block[:, i:] -= err[:, None] * h_inv_block[i, i:][None, :]
            errors[:, i] = err
        w[:, end:] -= errors @ h_inv[start:end, end:]
    return _packed(codes.T, scales, zeros, symmetric, scale_dtype)
