"""Samples (bundled benchmark or data files) and their encoding into model inputs."""

from modes.data.encoding import encode_prompts, encode_teacher_forced
from modes.data.sample import Sample, batches_by_kind
from modes.data.samples import Columns, DataFileError, export_samples, load_samples

__all__ = [
    "Columns",
    "DataFileError",
    "Sample",
    "batches_by_kind",
    "encode_prompts",
    "encode_teacher_forced",
    "export_samples",
    "load_samples",
]
