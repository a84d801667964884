"""asv benchmarks of fastbn (see benchmarks/README.md)."""
