"""Using trained models: predict, evaluate, heatmaps and result grids."""
