"""What a site admin sees and checks: status figures, recent activity, Prometheus metrics and
`verify` (every catalog row against its object)."""
