"""fl: federated training that composes privacy layers (``dp``) and secure sums (``secagg``)."""
