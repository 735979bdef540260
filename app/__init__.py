"""radcohort: PACS query/retrieve, header labels, cohorts and CNN training."""

__version__ = "0.1.0"
