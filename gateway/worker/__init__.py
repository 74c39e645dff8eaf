"""Model workers: one model instance served over HTTP in the EAS protocol."""
