"""One error base for the domain; the API maps it to HTTP, the SCU to retry decisions."""

from __future__ import annotations


class RadcohortError(Exception):
    """Base domain error carrying an HTTP status for the API boundary."""

    status_code = 400

    def __init__(self, message: str, *, status_code: int | None = None):
        super().__init__(message)
        self.message = message
        if status_code is not None:
            self.status_code = status_code


class NotFound(RadcohortError):
    status_code = 404


class Conflict(RadcohortError):
    status_code = 409


class InvalidInput(RadcohortError):
    status_code = 422


class DicomError(RadcohortError):
    """A DICOM network operation failed."""

    status_code = 502


class RetriableDicomError(DicomError):
    """Worth retrying: connection refused/reset, timeout, association aborted, 0xA7xx out of resources."""

    status_code = 504


class PermanentDicomError(DicomError):
    """Retrying will not help: association rejected, unknown destination, bad identifier."""

    status_code = 502


class ServiceUnavailable(RadcohortError):
    status_code = 503
