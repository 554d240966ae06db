"""Datasets at scale: webdataset tar shards and caption files prepared into ArrayRecord shards of records.

`prepare` converts the inputs once (resumably); `RecordSource` then gives random access to the records, as a
grain data source, and `decode_record` reads each one; `Pipeline` draws global batches from a source (grain).
array_record and grain are imported only when shards are read or written, or batches drawn.
"""

from dualenc.datasets.pipeline import GlobalOrder, PairSource, Pipeline
from dualenc.datasets.prepare import prepare
from dualenc.datasets.records import (
    Record,
    RecordSource,
    decode_record,
    encode_record,
    read_manifest,
    record_image_path,
)
from dualenc.datasets.webdataset import Sample, expand_braces, expand_shards, iter_tar

__all__ = [
    "GlobalOrder",
    "PairSource",
    "Pipeline",
    "Record",
    "RecordSource",
    "Sample",
    "decode_record",
    "encode_record",
    "expand_braces",
    "expand_shards",
    "iter_tar",
    "prepare",
    "read_manifest",
    "record_image_path",
]
