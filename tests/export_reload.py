"""Reload exported artifacts in a fresh process, as a server would, without inception_flax:
`python tests/export_reload.py JOBS.json OUT.npz` (tests/test_export.py runs it).

JOBS.json: a list of {"name", "format": "stablehlo" | "savedmodel", "dir",
"images": {key: .npy path}, "files": [encoded image paths] (SavedModel only)}.
Writes OUT.npz with "<name>/<key>/<output>" for every output of every call
("<name>/files/<output>" for the encoded-image signature).
"""

import json
import os
import sys

import numpy as np


def reload_stablehlo(job, results):
    from jax import export

    with open(os.path.join(job["dir"], "model.stablehlo"), "rb") as f:
        exported = export.deserialize(bytearray(f.read()))
    for key, path in job["images"].items():
        for output, value in exported.call(np.load(path)).items():
            results[f"{job['name']}/{key}/{output}"] = np.asarray(value)


def reload_savedmodel(job, results):
    import tensorflow as tf

    loaded = tf.saved_model.load(job["dir"])
    serve = loaded.signatures["serving_default"]
    for key, path in job["images"].items():
        for output, value in serve(images=tf.constant(np.load(path))).items():
            results[f"{job['name']}/{key}/{output}"] = value.numpy()
    if job.get("files"):
        data = [open(p, "rb").read() for p in job["files"]]
        out = loaded.signatures["serving_bytes"](image_bytes=tf.constant(data))
        for output, value in out.items():
            results[f"{job['name']}/files/{output}"] = value.numpy()


def main(jobs_path, out_path):
    with open(jobs_path) as f:
        jobs = json.load(f)
    results = {}
    # SavedModels first, before this process uses jax.export itself, as a server would.
    for job in sorted(jobs, key=lambda j: j["format"] != "savedmodel"):
        {"stablehlo": reload_stablehlo, "savedmodel": reload_savedmodel}[job["format"]](
            job, results)
    assert not any(m.startswith("inception_flax") for m in sys.modules), "package imported"
    np.savez(out_path, **results)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
