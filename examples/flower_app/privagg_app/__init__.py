"""privagg_app: a standard Flower app whose train round runs through privagg's secure aggregation."""
