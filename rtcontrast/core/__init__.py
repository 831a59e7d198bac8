"""The science the node and the research loop share: the signal equation, the ONNX contract, maps, rendering, fits. No DICOM, no network, no torch."""
