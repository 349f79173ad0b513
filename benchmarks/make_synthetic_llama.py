"""Write a Llama-shaped checkpoint of random weights as sharded safetensors, shard by shard.

Run:
    python benchmarks/make_synthetic_llama.py --shape llama2-7b
    python benchmarks/make_synthetic_llama.py --shape llama3-8b
    python benchmarks/make_synthetic_llama.py --tiny --out /tmp/tiny-llama

The generator (shapes, per-layer scales, planted redundancy) is :mod:`netfold.bench.synthetic`.
"""

from netfold.bench.synthetic import main

if __name__ == "__main__":
    raise SystemExit(main())
