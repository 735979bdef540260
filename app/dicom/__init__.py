"""DICOM networking (pynetdicom) and the UID-keyed store; no database here."""
