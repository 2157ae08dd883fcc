"""lung_cls: perfusion vs ventilation classification of planar lung scintigraphy.

Entry points (one module per command): ``lung_cls.train``, ``lung_cls.report``,
``lung_cls.predict``, ``lung_cls.export``, ``lung_cls.phantom``, ``lung_cls.preprocess``.
The logic lives in the subpackages ``data``, ``models`` and ``evaluation``.
"""

__version__ = "0.1.0"
