"""PredictionGridMonitor's sample reading and drawing."""
