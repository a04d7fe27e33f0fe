//! fake NVML (filled in by the health work)
