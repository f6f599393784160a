"""MemoryMonitor's sources: CUDA allocator statistics, NVML, host memory of the process and its workers."""
