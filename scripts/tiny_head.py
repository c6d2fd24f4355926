#!/usr/bin/env python3
"""Writes a fusion head with the embedded head's modalities and input widths (vision 1024,
text 768, audio 128) but a common width D of 8, as safetensors, with the standard library only.

Its device cost is ~1/60 of the embedded head's (D = 512), while every byte a client sends is the
same, so `serve --model` on it measures what the server and its clients cost per sample apart
from the device (scripts/cpu-check.sh, issue 6's ceiling).

    python3 scripts/tiny_head.py OUT.safetensors [D]
"""
import array
import json
import random
import struct
import sys

MODALITIES = [("vision", 1024), ("text", 768), ("audio", 128)]


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        sys.exit(__doc__)  # usage (an option is not an output path)
    out = sys.argv[1]
    d = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    rng = random.Random(7)
    tensors = []
    for name, width in MODALITIES:
        bound = 1.0 / width**0.5
        tensors.append((f"proj.{name}.weight", [d, width], [rng.uniform(-bound, bound) for _ in range(d * width)]))
        tensors.append((f"proj.{name}.bias", [d], [rng.uniform(-bound, bound) for _ in range(d)]))
    tensors.append(("gate.weight", [1, d], [rng.uniform(-1, 1) for _ in range(d)]))
    tensors.append(("norm.weight", [d], [1.0] * d))
    tensors.append(("norm.bias", [d], [0.0] * d))
    header = {"__metadata__": {"modalities": ",".join(m for m, _ in MODALITIES), "eps": "1e-5"}}
    data = bytearray()
    for name, shape, values in tensors:
        b = array.array("f", values)
        if sys.byteorder != "little":
            b.byteswap()
        raw = b.tobytes()
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(out, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + bytes(data))


if __name__ == "__main__":
    main()
