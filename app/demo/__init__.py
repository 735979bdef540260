"""The one-command demo: a synthetic PACS in Orthanc, radcohort's processes, and the whole flow over REST.

`runner.run_demo` sets up and tears down the processes; `flow.run_flow` drives the REST API only;
`report` prints the study's Table 2 for the run. The e2e test runs the same code at a tiny size.
"""
