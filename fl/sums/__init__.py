"""Secure sums: the one multi-round step that ends a pipeline (plain, SecAgg/SecAgg+, Paillier)."""
