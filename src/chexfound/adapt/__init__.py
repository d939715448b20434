"""Adaptation on frozen, cached features: GLoRI, linear/MLP probes, other targets, grid training, heatmaps."""
