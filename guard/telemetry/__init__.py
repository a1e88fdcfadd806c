"""Telemetry: the SDK set-up and log lines (:mod:`.setup`), the guard's spans and metrics
(:mod:`.instruments`) and the conventions the host SDK shares (:mod:`.conventions`).

Nothing is imported here: the host SDK imports only the conventions, never the SDK set-up."""
