"""COCO's compressed RLE strings, parsed in Python: pycocotools takes any string without checking it, so
the loader reads the run lengths itself to tell a malformed or wrongly sized RLE by its annotation id."""

from __future__ import annotations


def rle_string_runs(counts: str) -> list[int] | None:
    """Run lengths of a compressed COCO RLE string (LEB128-like, 5 bits a character, offset 48, each run
    after the second stored relative to the run two before it); None when the string is malformed."""
    runs: list[int] = []
    pos = 0
    while pos < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if pos >= len(counts):
                return None
            c = ord(counts[pos]) - 48
            if not 0 <= c < 64:
                return None
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            pos += 1
            shift += 5
            if not more and c & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs
