"""Privacy accounting: the ledger, DP events per observer, and the plan that maps CLI words to objects."""
