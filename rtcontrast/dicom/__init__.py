"""DICOM objects: reading series into volumes, grids and resampling, UIDs, and the writers of derived objects. No network, no database."""
