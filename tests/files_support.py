"""Running ``embq embed`` as a user does, and reading back every output format."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBQ_")}
    return {**env, **extra}


def embq(
    *args: str, env: dict[str, str], timeout: float = 300, stdin: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "embq", *args],
        env=env,
        input=stdin,
        capture_output=True,
        timeout=timeout,
        cwd=ROOT,
    )
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())


def write_input(path: Path, texts: list[str], ids: list[Any] | None = None, field: str = "text") -> Path:
    """``texts`` (and ``ids`` under ``id``) in the format of ``path``'s suffix."""
    columns: dict[str, Any] = {field: texts} if ids is None else {"id": ids, field: texts}
    if path.suffix == ".txt":
        path.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    elif path.suffix == ".jsonl":
        rows = [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    elif path.suffix == ".csv":
        pcsv.write_csv(pa.table(columns), path)
    elif path.suffix == ".parquet":
        pq.write_table(pa.table(columns), path, row_group_size=1000)
    else:
        raise ValueError(path)
    return path


def read_output(path: Path, id_field: str = "row") -> tuple[list[Any] | None, np.ndarray, list[str | None]]:
    """``(ids, vectors, errors)``: NaN rows and an error where a row failed; no ids in a ``.npy``."""
    if path.suffix == ".npy":
        vectors = np.load(path)
        return None, vectors, [None] * len(vectors)
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        assert table.column_names == [id_field, "embedding", "error"], table.schema
        assert pa.types.is_fixed_size_list(table.schema.field("embedding").type)
        assert table.schema.field("embedding").type.value_type == pa.float32()
        rows = table.column("embedding").to_pylist()
        ids = table.column(id_field).to_pylist()
        errors = table.column("error").to_pylist()
        assert [row is None for row in rows] == [error is not None for error in errors]
    else:
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        assert all(list(r)[:2] == [id_field, "embedding"] for r in records), records[:1]
        rows = [r["embedding"] for r in records]
        ids = [r[id_field] for r in records]
        errors = [r.get("error") for r in records]
    width = next((len(row) for row in rows if row is not None), 0)
    vectors = np.array([row if row is not None else [np.nan] * width for row in rows], dtype=np.float32)
    return ids, vectors.reshape(len(rows), width), errors
