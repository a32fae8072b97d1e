"""Training: the client side (one site), the server side (sampling, aggregation, ledger) and the loop."""
