"""SQLite persistence: the connection, schema versions, instances, jobs and audit."""
