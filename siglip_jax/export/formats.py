"""The export formats by name: each writes a loaded model (config + params) to `output`.

    hf         an HF SigLIP directory (siglip_jax.export.hf)
    stablehlo  serialized jax.export embedding functions + params (siglip_jax.export.stablehlo)
    params     one exported-params file (siglip_jax.export.params)
"""
from __future__ import annotations

from typing import Sequence

from siglip_jax.export import hf, stablehlo
from siglip_jax.export import params as params_lib

FORMATS = ("hf", "stablehlo", "params")
HF_DTYPES = ("float32", "bfloat16", "float16")


def export_model(exported: params_lib.ExportedParams, format: str, output: str, dtype: str = "float32",
                 platforms: Sequence[str] | None = None) -> None:
    """Writes `exported` to `output` in `format`, parameters cast to `dtype`."""
    if format not in FORMATS:
        raise ValueError(f"Unknown export format {format!r}; valid: {', '.join(FORMATS)}.")
    valid_dtypes = HF_DTYPES if format == "hf" else params_lib.PARAM_DTYPES
    if dtype not in valid_dtypes:
        raise ValueError(f"--dtype {dtype!r} is not available for --format {format}; valid: {', '.join(valid_dtypes)}.")
    if format == "hf":
        hf.save_hf_directory(output, exported.config, exported.params, dtype=dtype)
    elif format == "stablehlo":
        stablehlo.save_stablehlo(output, exported.config, exported.params, dtype=dtype, platforms=platforms)
    else:
        params_lib.save_params_file(output, exported.config, exported.params, dtype=dtype)
