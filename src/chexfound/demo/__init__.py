"""`chexfound demo`: the whole pipeline on real CXRs, scaled to a CPU, with honest baselines."""
