"""FGID training data: record schema and validation, the original's sample construction, dataset.

Host-independent (torch, numpy, PIL); the trainer in ``train/`` builds on it.
"""

from .dataset import DEFAULT_DROP_PROB, FGIDDataset, ResumableBatchSampler, collate, sample_rng
from .sample import ID_EMBEDDING_DIM, TENSOR_FIELDS, SampleOptions, build_sample, load_id_embedding, load_parsing_map
from .schema import (
    DataRoots,
    DatasetFormatError,
    FGIDIndex,
    FGIDRecord,
    KeyChoice,
    RecordProblem,
    check_files,
    parse_record,
    read_fgid,
)

__all__ = [
    "DEFAULT_DROP_PROB",
    "DataRoots",
    "DatasetFormatError",
    "FGIDDataset",
    "FGIDIndex",
    "FGIDRecord",
    "ID_EMBEDDING_DIM",
    "KeyChoice",
    "RecordProblem",
    "ResumableBatchSampler",
    "SampleOptions",
    "TENSOR_FIELDS",
    "build_sample",
    "check_files",
    "collate",
    "load_id_embedding",
    "load_parsing_map",
    "parse_record",
    "read_fgid",
    "sample_rng",
]
