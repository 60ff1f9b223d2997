"""Research beside the product: attacks, victims, SSL, baselines, metrics, downstream probes, datasets, the
detection / generalization / throughput benchmarks and the demo. It imports dede_core, never the reverse."""
