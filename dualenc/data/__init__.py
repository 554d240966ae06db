"""Image-text pairs, from a caption file over an image folder to the global batches of a many-host run.

- pairs.py: a caption file (JSONL/CSV/TSV) over an image folder read whole (`read_pairs`), the embedded digits
  (`load_digits`), in-memory batches (`Batches`);
- captions.py: the same caption files streamed from a byte offset, each row a record (for `prepare`);
- webdataset.py: webdataset tar shards, read within bounds;
- records.py: the record format and random access to a prepared folder of ArrayRecord shards (`RecordSource`);
- prepare.py: tars and caption files converted once (resumably) into such a folder;
- pipeline.py: global batches over a random-access source on grain (`Pipeline`), augmented on request;
- mixing.py: several sources drawn in proportion to weights (`Mixture`, open_clip's upsampling factors).

array_record and grain are imported only when shards are read or written, or batches drawn.
"""

from dualenc.data.pairs import (
    DIGIT_TEMPLATES,
    DIGIT_WORDS,
    Batches,
    PairDataset,
    load_digits,
    read_pairs,
    write_vocab,
)
from dualenc.data.mixing import Mixture
from dualenc.data.pipeline import GlobalOrder, PairSource, Pipeline
from dualenc.data.prepare import prepare
from dualenc.data.records import (
    Record,
    RecordSource,
    decode_record,
    encode_record,
    read_manifest,
    record_image_path,
)
from dualenc.data.webdataset import Sample, expand_braces, expand_shards, iter_tar

__all__ = [
    "DIGIT_TEMPLATES",
    "DIGIT_WORDS",
    "Batches",
    "GlobalOrder",
    "Mixture",
    "PairDataset",
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
    "load_digits",
    "prepare",
    "read_manifest",
    "read_pairs",
    "record_image_path",
    "write_vocab",
]
