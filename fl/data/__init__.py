"""Data: loading sites (bundled sets, users' CSVs) and federated preprocessing statistics."""
