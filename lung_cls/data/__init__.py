"""Data: sources -> pre-processing (+ cache) -> patient-grouped split -> on-device batches.

Light imports only (NumPy/SciPy/pydicom); the Lightning data module lives in
``lung_cls.data.datamodule`` and is imported from there.
"""

from lung_cls.data.preprocess import PreparedData, prepare_dataset, preprocess_set
from lung_cls.data.sources import CLASS_NAMES, DataError, Study, load_studies, read_image

__all__ = [
    "CLASS_NAMES",
    "DataError",
    "PreparedData",
    "Study",
    "load_studies",
    "prepare_dataset",
    "preprocess_set",
    "read_image",
]
