"""DICOMweb as a second protocol: QIDO-RS listing and WADO-RS retrieval into the same store and index."""
