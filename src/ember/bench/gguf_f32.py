"""A float32 GGUF of a quantised one, for a like-for-like peer: llama.cpp serving the
same float32 weights Ember serves (Ember's import dequantises the GGUF the same way).

`python -m ember.bench.gguf_f32 [SOURCE.gguf] DEST.gguf` (SOURCE: the default model's
GGUF). Every metadata key is copied but the file type, which becomes all-F32; every
tensor is dequantised with the `gguf` package's own kernels.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ember.errors import InvalidRequestError

_ALL_F32 = 0  # llama.cpp's LLAMA_FTYPE_ALL_F32
_SKIPPED = ("GGUF.", "general.architecture", "general.file_type")  # the writer writes these


def write_f32_gguf(source: Path, dest: Path) -> None:
    """Write `source` (any GGUF the gguf package reads) to `dest` with float32 tensors."""
    import numpy as np
    from gguf import GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize

    try:
        reader = GGUFReader(source)
    except (OSError, ValueError) as e:
        raise InvalidRequestError(f"cannot read {source} as GGUF: {e}") from e
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(dest, arch)
    for name, field in reader.fields.items():
        if name.startswith(_SKIPPED):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub)
    writer.add_file_type(_ALL_F32)
    for t in reader.tensors:
        # shapes in GGUF list the fastest dimension first; numpy wants it last
        data = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(tuple(reversed(t.shape.tolist())))
        writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main(argv: list[str]) -> int:
    from ember.store.importer import default_model_source

    if len(argv) not in (1, 2):
        print("usage: python -m ember.bench.gguf_f32 [SOURCE.gguf] DEST.gguf", file=sys.stderr)
        return 2
    source = Path(argv[0]) if len(argv) == 2 else default_model_source()
    write_f32_gguf(source, Path(argv[-1]))
    print(f"wrote {argv[-1]} (float32) from {source}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
