"""Data: what the networks train and evaluate on.

- `pipeline`: the tf.data input pipeline (TFDS datasets or image folders, Inception
  preprocessing, checkpointable iterators).
- `preprocess`: the Inception preprocessing of one image (decode, crop, resize, flip).
- `sharding`: each process's slice of the global batch, read from the pipeline and
  assembled into arrays sharded over the devices of every process.
- `info`: a dataset's classes and split sizes, checked against the config.
- `digits`: the `inception_digits` TFDS builder (scikit-learn's 8x8 digits, offline).

Importing this package imports nothing else (in particular, not TensorFlow).
"""
