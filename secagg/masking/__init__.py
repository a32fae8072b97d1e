"""SecAgg (Bonawitz et al. 2017) and SecAgg+ (Bell et al. 2020): pairwise-mask secure aggregation machines."""
