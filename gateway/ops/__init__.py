"""What a site admin sees and checks: health and status figures, recent activity, Prometheus
metrics, `verify` (every catalog row against its object), backup and restore, error wording."""
