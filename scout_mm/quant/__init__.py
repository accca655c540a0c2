"""Int4 weights for scout_mm: the packed format, RTN and GPTQ quantizers, Int4 modules swapped into a model
from outside, and checkpoint quantize / save / load. Layout and config: ``FORMAT.md`` in this folder.

    from scout_mm.quant import QuantConfig, calibration_from_jsonl, quantize_checkpoint, load_quantized
    quantize_checkpoint("bf16_ckpt", "int4_ckpt", QuantConfig(group_size=128, method="rtn"))
    calibration = calibration_from_jsonl(processor, "data.jsonl")  # GPTQ: real data, 128K tokens
    report = quantize_checkpoint("bf16_ckpt", "gptq_ckpt", QuantConfig(method="gptq"), calibration)
    model = load_quantized("int4_ckpt", dtype=torch.bfloat16, device="cuda")
"""

from scout_mm.quant.calibration import calibration_from_jsonl, calibration_set
from scout_mm.quant.format import QuantConfig, dequantize, pack_int4, quantize_rtn, unpack_int4
from scout_mm.quant.gptq import Hessian, quantize_gptq
from scout_mm.quant.load import load_quantized, quantized_bytes
from scout_mm.quant.modules import HostEmbedding, Int4Experts, Int4Linear, offload_embeddings
from scout_mm.quant.quantize import (
    CalibrationWarning,
    QuantReport,
    quant_targets,
    quantize_checkpoint,
    quantize_model,
    save_quantized,
)

__all__ = [
    "QuantConfig",
    "quantize_rtn",
    "quantize_gptq",
    "Hessian",
    "pack_int4",
    "unpack_int4",
    "dequantize",
    "Int4Linear",
    "Int4Experts",
    "HostEmbedding",
    "offload_embeddings",
    "quant_targets",
    "quantize_model",
    "quantize_checkpoint",
    "QuantReport",
    "CalibrationWarning",
    "save_quantized",
    "load_quantized",
    "quantized_bytes",
    "calibration_set",
    "calibration_from_jsonl",
]
