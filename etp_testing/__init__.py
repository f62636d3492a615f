"""etp_testing: the harness that proves ETP rules right."""
