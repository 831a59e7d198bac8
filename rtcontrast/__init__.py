"""rtcontrast: synthetic spin-echo contrasts for MR-only radiotherapy planning.

Data flows one way, one module per stage:

    scanner -> scp (receive) -> spool -> series (completion) -> jobs -> volume
            -> qmap (onnxruntime) -> render -> derive (DICOM) -> outbox -> TPS

Training-side modules (``phantom``, ``model``, ``train``, ``evaluate``) import torch;
node-side modules never do.
"""

__version__ = "0.1.0"
