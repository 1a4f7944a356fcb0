"""Drift monitoring and alerting: drift measures, alert rules, the alert engine and its sinks."""
