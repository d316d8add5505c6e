"""Custom compute kernels (Pallas for accelerators), each beside a plain-JAX reference it is tested against.

Empty for now: the foundation's throughput fix needed no kernel (see bdjax/runtime.py and
scripts/bench_train.py). Population training (model zoos) is where kernels land, with a
`reference_*` function in jnp and a test running the kernel in interpret mode on CPU.
"""
