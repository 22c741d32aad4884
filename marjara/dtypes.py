"""Weight dtypes by name, in one table for each spelling: MARJARA's flags and DeepSpeed's JSON
blocks ("bf16"), torch and config.json, MARJARA's and transformers' ("bfloat16"), and safetensors
headers ("BF16")."""

from __future__ import annotations

import torch

from marjara.errors import MarjaraError

# --mixed_precision, as DeepSpeed's "bf16" / "fp16" blocks name the precisions.
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# --dtype of convert, generate and evaluate: the dtypes an exported model holds.
WEIGHT_FLAGS = {"fp32": torch.float32, "bf16": torch.bfloat16}
# torch's names, which config.json records ("dtype"; transformers' "torch_dtype" too).
TORCH_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_NAME_OF = {dtype: name for name, dtype in TORCH_NAMES.items()}
# What an export's config.json may record: the weight dtypes, by torch's names.
EXPORT_NAMES = {_NAME_OF[dtype]: dtype for dtype in WEIGHT_FLAGS.values()}
SAFETENSORS_CODES = {
    torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def export_name(dtype: torch.dtype) -> str:
    """The name an export records for `dtype`; one line for a dtype no export holds."""
    if dtype not in WEIGHT_FLAGS.values():
        raise MarjaraError(f"cannot export weights as {dtype}; choose {' or '.join(EXPORT_NAMES)}")
    return _NAME_OF[dtype]


def weight_dtype_names() -> dict[str, torch.dtype]:
    """A weight dtype by either of its names (fp32 / float32, bf16 / bfloat16), as lm-eval's
    --model_args dtype= takes it."""
    return {name: dtype for flag, dtype in WEIGHT_FLAGS.items() for name in (flag, _NAME_OF[dtype])}
