"""The research loop: phantoms, datasets, the torch model, training, evaluation, reports, DICOM import. Never imports rtcontrast.node."""
