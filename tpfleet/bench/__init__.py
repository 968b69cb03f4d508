"""Benchmarks that compare tpfleet with its peers in the same run (`tpfleet bench ...`)."""
