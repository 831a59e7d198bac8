"""Derived objects -> TPS: the durable outbox and its C-STORE sender."""
