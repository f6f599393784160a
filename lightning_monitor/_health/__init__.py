"""HealthMonitor's rules and their engine (shared with `lightning-monitor replay`), where its values come from (an
in-memory logger and writer), and where its alerts go (terminal, alerts.jsonl)."""
