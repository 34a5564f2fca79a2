"""The usual way to turn an SD safetensors file into a MindSpore ckpt, as a baseline for the bench.

It is what mindone's and most community converters do: load the whole file, cast every tensor to float32,
wrap each in a ``mindspore.Parameter`` and hand the list to ``mindspore.save_checkpoint``. The model is then
held several times over (the fp16 dict, the fp32 copies, MindSpore's tensors, the serialized records), which is
exactly what the bench compares the streaming converter against. Key renames (``.weight`` -> ``.gamma`` ...)
cost nothing measurable and are left out so this file needs no keymap.

Run: ``python -m bench.baseline_mindone SRC.safetensors DST.ckpt``
"""

from __future__ import annotations

import os
import sys

import numpy as np


def convert(src: str, dst: str) -> int:
    """Convert ``src`` to a float32 MindSpore ckpt at ``dst``; returns the number of tensors written."""
    import mindspore as ms
    from safetensors.numpy import load_file

    tensors = load_file(src)  # the whole model in RAM
    params = []
    for name, array in tensors.items():
        if np.issubdtype(array.dtype, np.floating):
            array = array.astype(np.float32)  # mindone always writes float32
        params.append({"name": name, "data": ms.Parameter(ms.Tensor(array), name=name)})
    ms.save_checkpoint(params, dst)
    with open(dst, "rb") as handle:  # the same durability as the streaming writers, which fsync
        os.fsync(handle.fileno())
    return len(params)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m bench.baseline_mindone SRC.safetensors DST.ckpt", file=sys.stderr)
        return 2
    count = convert(args[0], args[1])
    print(f"wrote {count} tensors to {args[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
