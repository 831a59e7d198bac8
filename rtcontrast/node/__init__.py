"""The clinical service: receive, store, run jobs, dispatch to the TPS, operate. Never imports rtcontrast.research."""
