"""k-fold patient-level cross-validation of the method on any prepared dataset (`cvfast crossval`).

folds.py draws the folds and writes each fold's DATA folder; scores.py turns models and baselines into per-image
scores (the patch model's max over breast windows, the frozen linear probe, brightness, a density prior); run.py
trains fold by fold, resumably; report.py pools the out-of-fold predictions into AUCs with patient-bootstrap CIs,
the diagnostics and the Markdown / JSON report.
"""
