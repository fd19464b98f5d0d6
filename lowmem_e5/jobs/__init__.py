"""Files in, files out: reading inputs, the resumable corpus job, and atomic writes."""
