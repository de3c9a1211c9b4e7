"""bss_model: data, the U-Net family, training and the reference evaluation protocol.

Nothing in this package imports Ray: the search in ``search/`` wraps it.
"""

__version__ = "0.1.0"
