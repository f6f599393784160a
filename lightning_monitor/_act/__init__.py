"""ActivationMonitor's internals: which modules it watches (select.py) and the on-device statistics (tap.py)."""
