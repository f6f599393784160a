"""GradientMonitor's measurements: norms, groups and caps, NaN/Inf bookkeeping, device statistics and binning, global
statistics over DTensor shards, and the logging step that ties them together."""
