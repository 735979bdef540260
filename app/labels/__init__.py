"""Normalized labels from DICOM headers: rules file, pure engine, database service."""
