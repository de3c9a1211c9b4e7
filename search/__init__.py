"""search: Ray Tune + Optuna search over the bss_model U-Net family, retrain over seeds, report.

Entry points: ``python search/run.py --config configs/<name>.yaml`` and
``python search/retrain.py --experiment results/<name>``.
"""
