"""Helpers to run real peers (Orthanc) locally for tests, benchmarks and the demo."""
