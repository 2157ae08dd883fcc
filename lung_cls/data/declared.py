"""Moved to `lung_cls.qa.declared` (the declared class is the QA check's business); re-exported here
until nothing imports it from this path."""

from lung_cls.qa.declared import (  # noqa: F401
    AMBIGUOUS,
    DEFAULT_IGNORE,
    DEFAULT_KEYWORDS,
    KNOWN_CLASSES,
    PERFUSION,
    SERIES_FIELDS,
    STUDY_FIELDS,
    UNKNOWN,
    VENTILATION,
    Declared,
    KeywordMatcher,
    dataset_texts,
    declared_for_file,
    declared_from_texts,
    dicom_header_texts,
    keyword_map_from_config,
    read_declared_manifest,
)
