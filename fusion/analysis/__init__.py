"""Analyses of trained models.

- `robustness`: the score with each modality dropped or perturbed at increasing levels, and
  the curves' relative and effective robustness (after MultiBench); `Evaluator`, which the
  other analyses share, scores one model on one split.
- `perturbations`: the perturbations of each modality kind (image, audio, text, tabular)
  that `robustness` applies, as pure functions of a batch's inputs, a level and a generator.
- `interaction`: EMAP (Hessel & Lee 2020), does a model use cross-modal interactions?
- `contributions`: each modality's Shapley value of the score, over presence masks.
- `retrieval`: cross-modal retrieval (recall@K, median rank) over a split.
"""
