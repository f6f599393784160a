"""The base of every monitor (cadence, warn-once, setup checks, hook timing), the one door monitors log through
(dispatch) and the cross-rank helpers."""
