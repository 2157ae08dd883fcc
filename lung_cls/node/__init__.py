"""The QA node: a DICOM store-and-forward node between the gamma camera and the PACS.

    spool     durable received files (atomic write + fsync before the C-STORE success)
    audit     SQLite log and work list at <spool>/audit.sqlite (table ``instances``)
    check     lung series?, anterior image, the QA check through one adapter -> series verdict
    report    the check as a DICOM structured report (highdicom), in the same study
    forward   C-STORE / C-FIND to the PACS (pynetdicom)
    server    the node: SCP, checker and forwarder threads
    settings  conf/node.yaml, read and checked
    release   release or discard a held series (``python -m lung_cls.node.release``)

Doors: ``python -m lung_cls.node`` (run the node) and ``python -m lung_cls.node.release``.
See docs/node.md.
"""
