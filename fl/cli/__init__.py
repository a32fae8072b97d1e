"""The privagg command line: train, demo, sweep, compare, audit, flower."""
