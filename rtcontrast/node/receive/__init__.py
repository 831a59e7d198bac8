"""Scanner -> spool -> series: the Storage SCP, the durable spool and series completion."""
