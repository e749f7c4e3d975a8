"""A list of small records stored as one byte buffer, so DataLoader workers share it cheaply.

Python lists of dicts are touched by reference counting in every forked worker, which copies
their memory pages one by one; a single NumPy buffer plus offsets is never written to.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from typing import Any

import numpy as np


class CompactRecordList:
    """Read-only sequence of picklable records kept as one ``uint8`` buffer."""

    def __init__(self, records: Iterable[Any]) -> None:
        chunks = [pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL) for record in records]
        self._offsets = np.cumsum([0] + [len(chunk) for chunk in chunks], dtype=np.int64)
        self._buffer = np.frombuffer(b"".join(chunks), dtype=np.uint8) if chunks else np.zeros(0, dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < len(self):
            raise IndexError(index)
        start, end = int(self._offsets[index]), int(self._offsets[index + 1])
        return pickle.loads(self._buffer[start:end].tobytes())
