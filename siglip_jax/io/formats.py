"""The export formats by name: each writes a loaded model (config + params) to `output`.

    hf         an HF SigLIP directory (siglip_jax.io.hf)
    stablehlo  serialized jax.export embedding functions + params (siglip_jax.io.stablehlo)
    params     one exported-params file (siglip_jax.io.params)
"""
from __future__ import annotations

import os
import tempfile
from typing import Sequence

from siglip_jax.io import hf, params as params_lib, stablehlo
from siglip_jax.runtime import storage

FORMATS = ("hf", "stablehlo", "params")
HF_DTYPES = ("float32", "bfloat16", "float16")


def check_output(output: str, format: str, overwrite: bool = False) -> None:
    """Refuses, before anything is written, an `output` whose contents the export would replace (unless
    `overwrite`) or that is the wrong kind of path for `format` (a directory for params, a file for the
    directory formats)."""
    location = storage.path(output)  # gs:// and s3:// outputs too
    if format == "params":
        if location.is_dir():
            raise IsADirectoryError(f"--output {output!r} is a directory, but --format params writes one file; "
                                    f"name the file, e.g. --output {os.path.join(output, 'model.msgpack')}.")
        if location.exists() and not overwrite:
            raise FileExistsError(f"--output {output!r} already exists; pass --overwrite to replace it, or choose "
                                  "another --output.")
        return
    if location.exists() and not location.is_dir():
        raise NotADirectoryError(f"--output {output!r} is a file, but --format {format} writes a directory; choose "
                                 "a new or empty directory.")
    entries = sorted(entry.name for entry in storage.list_folder(location)) if location.is_dir() else []
    if entries and not overwrite:
        raise FileExistsError(
            f"--output {output!r} is not empty ({len(entries)} entries, e.g. {entries[:3]}); --format {format} "
            "would overwrite files in it. Choose a new or empty directory, or pass --overwrite to write into it.")


def export_model(exported: params_lib.ExportedParams, format: str, output: str, dtype: str = "float32",
                 platforms: Sequence[str] | None = None, overwrite: bool = False, with_decoder: bool = False) -> None:
    """Writes `exported` to `output` in `format`, parameters cast to `dtype`. Existing files at `output` are
    only replaced with `overwrite` (see check_output). The two towers are written; a caption decoder
    (SigLIP 2 recipe) stays in the checkpoint unless `with_decoder` (params format only) keeps it."""
    if format not in FORMATS:
        raise ValueError(f"Unknown export format {format!r}; valid: {', '.join(FORMATS)}.")
    if with_decoder and format != "params":
        raise ValueError(f"--with_decoder keeps the caption decoder in a params file; --format {format} holds the two "
                         "towers only. Use --format params, or leave out --with_decoder.")
    if not with_decoder:
        exported = params_lib.towers_only(exported)
    valid_dtypes = HF_DTYPES if format == "hf" else params_lib.PARAM_DTYPES
    if dtype not in valid_dtypes:
        raise ValueError(f"--dtype {dtype!r} is not available for --format {format}; valid: {', '.join(valid_dtypes)}.")
    check_output(output, format, overwrite)
    if storage.is_remote(output):  # the writers take local paths: write here, then upload whole
        with tempfile.TemporaryDirectory(prefix="siglip_export_") as scratch:
            local = os.path.join(scratch, storage.path(output).name)
            _write(exported, format, local, dtype, platforms)
            storage.upload(local, output)
        return
    _write(exported, format, output, dtype, platforms)


def _write(exported: params_lib.ExportedParams, format: str, output: str, dtype: str,
           platforms: Sequence[str] | None) -> None:
    if format == "hf":
        hf.save_hf_directory(output, exported.config, exported.params, dtype=dtype)
    elif format == "stablehlo":
        stablehlo.save_stablehlo(output, exported.config, exported.params, dtype=dtype, platforms=platforms)
    else:
        params_lib.save_params_file(output, exported.config, exported.params, dtype=dtype)
