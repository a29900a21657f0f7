"""Files in and out of embq, for ``embq embed`` and for pipeline steps (Spark, Ray, Airflow): no torch.

``embed_file(client, "in.jsonl", "out.parquet", id_field="id")`` does a whole
file; ``open_source``/``open_sink`` and ``embed_rows`` are its parts.
"""

from embq.producer.files.pipeline import Summary, embed_file, embed_rows
from embq.producer.files.sinks import Sink, open_sink
from embq.producer.files.sources import Chunk, Source, open_source

__all__ = ["Chunk", "Sink", "Source", "Summary", "embed_file", "embed_rows", "open_sink", "open_source"]
