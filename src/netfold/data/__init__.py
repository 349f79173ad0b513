"""Real data sets used by netfold's tests, examples and benchmarks.

``netfold.data.fashion_mnist`` loads Fashion-MNIST from the Debian package
``dataset-fashion-mnist`` (or any directory with the original IDX files) and provides the
fixed calibration subset used for REPAIR with data.
"""
