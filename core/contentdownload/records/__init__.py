"""The records: manifest, metrics and logs."""
