"""pathmil.mil: dual-level multiple-instance learning over the tile store.

- `TrainConfig`, `W2SConfig` (config.py): every training setting, with its default written once.
- `read_labels_csv`, `class_mapping` (labels.py): the labels CSV and the class order.
- `load_cohort` (cohort.py): bags from a tile store or CLAM/TRIDENT h5 files, one `FeatureSource` each.
- `make_splits` (splits.py): patient-level folds; `BagBatcher` (batching.py): padded size-bucketed batches.
- `create_model` (models/): ABMIL, CLAM-SB, DSMIL, TransMIL, each a bag branch in a `DualMIL`.
- `train_cohort` (train.py) with weak-to-strong correction (w2s.py); `predict_store` (predict.py) writes
  tile scores back to the store; `write_heatmap` (heatmap.py) draws them.
- `make_feature_cohort` (simulate.py): feature-level cohorts with a margin confounder, for tests and benchmarks.

Modules that need torch import it themselves; `import mil` stays light.
"""
