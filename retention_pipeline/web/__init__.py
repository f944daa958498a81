"""`retention-pipeline serve`: the web service a team deploys beside Dagster (Resend's delivery
webhooks, unsubscribe links, a health check). HTTP only: the rules it applies live in
`retention_pipeline.sending` (delivery events, suppressions)."""
