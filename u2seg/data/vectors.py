"""Vectors stored in Parquet: a shard file of embeddings and the Arrow column decoder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

if TYPE_CHECKING:
    pass


@dataclass(frozen=True)
class ParquetShard:
    """One shard of vectors in a Parquet file (local path or fsspec URL).

    `column` holds one vector per row as a fixed-size list (or equal-length lists) of floats;
    null vectors are an error, since every row must receive a cluster.
    """

    path: str
    column: str = "embedding"

    def num_rows(self) -> int:
        """Row count from the file footer, without reading the vectors."""
        fs, path = url_to_fs(self.path)
        with fs.open(path, "rb") as fh:
            return int(pq.ParquetFile(fh).metadata.num_rows)

    def load(self, batch_rows: int = 16_384) -> np.ndarray:
        """float32 (n, d) vectors of the column.

        Read in batches of `batch_rows` rows into one preallocated array, so the peak is the
        result plus about one row group, not the file, the Arrow table and the result."""
        name = f"{self.path}:{self.column}"
        fs, path = url_to_fs(self.path)
        with fs.open(path, "rb") as fh:
            parquet = pq.ParquetFile(fh, buffer_size=1 << 22, pre_buffer=False)
            if self.column not in parquet.schema_arrow.names:
                raise ValueError(f"{name}: no such column (columns: {parquet.schema_arrow.names})")
            n = parquet.metadata.num_rows
            out: np.ndarray | None = None
            row = 0
            for batch in parquet.iter_batches(batch_size=batch_rows, columns=[self.column]):
                part = vectors_from_arrow(batch.column(0), name)
                if out is None:
                    out = np.empty((n, part.shape[1]), dtype=np.float32)
                elif len(part) and part.shape[1] != out.shape[1]:
                    raise ValueError(f"{name}: vectors of different lengths")
                out[row : row + len(part)] = part
                row += len(part)
        # Arrow's allocator keeps freed batches for reuse; they are not coming back.
        pa.default_memory_pool().release_unused()
        if out is None:  # no rows
            kind = parquet.schema_arrow.field(self.column).type
            return np.zeros((0, getattr(kind, "list_size", 0)), dtype=np.float32)
        return out


def vectors_from_arrow(column: pa.ChunkedArray | pa.Array, name: str = "column") -> np.ndarray:
    """float32 (n, d) array of a list-of-floats Arrow column; errors name the column."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    kind = column.type
    if not (
        pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind) or pa.types.is_large_list(kind)
    ):
        raise ValueError(f"{name}: expected a list-of-floats vector column, got {kind}")
    if column.null_count:
        raise ValueError(f"{name}: {column.null_count} rows have a null vector")
    n = len(column)
    if pa.types.is_fixed_size_list(kind):
        d = kind.list_size
    else:
        lengths = np.concatenate(
            [pc.list_value_length(c).to_numpy(zero_copy_only=False) for c in chunks]
            or [np.zeros(0, np.int64)]
        )
        if n and lengths.min() != lengths.max():
            raise ValueError(
                f"{name}: vectors of different lengths ({lengths.min()} to {lengths.max()})"
            )
        d = int(lengths[0]) if n else 0
    # Filled chunk by chunk, so the table and one float32 copy is the peak, not two copies.
    out = np.empty((n, d), dtype=np.float32)
    row = 0
    for chunk in chunks:
        values = chunk.flatten().to_numpy(zero_copy_only=False)
        out[row : row + len(chunk)] = values.reshape(len(chunk), d)
        row += len(chunk)
    return out
