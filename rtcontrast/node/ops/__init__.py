"""Operating the node: logs, metrics, audit export, retention, systemd integration."""
