"""search: Ray Tune + Optuna search over the bss_model U-Net family, retrain over seeds, report.

Entry points: ``python search/run.py --config configs/<name>.yaml`` and
``python search/retrain.py --experiment results/<name>``, both thin command lines over
``pipeline``, which chains the steps in this order:

    config, space     the search config and its distributions, checked before Ray starts
    storage, cluster  the experiment folder and the Ray connection
    tuners, trainable the search and the retrain as Tune experiments of one trainable
    selection         Tune's results as typed rows (``results``) and the winner among them
    study             the search as an Optuna study in optuna.db, written as each trial ends
    best_model        best_model.pt and its test separations
    report, figures   report.json and report.md; the pictures
"""
