"""The two pretraining bundles are one deployable bundle per phase, so their configs repeat each other;
this test pins exactly which keys may differ, and how, so a fix made in one and forgotten in the other
fails here instead of drifting silently (issue "One house": the duplication goes, or a test pins it).

Why not a shared base merged through a list of config files: each bundle must run alone
(``python -m monai.bundle run --bundle_root bundles/micle_medical``, MONAI Label's model folder, an
exported copy), so a base would have to be copied into every bundle folder anyway.
"""

from __future__ import annotations

import json

from medssl_monai.bundle.locate import bundle_path

#: config file -> key -> (SimCLR value, MICLe value): the only differences allowed
ALLOWED = {
    "train.json": {
        "manifest": (None, "$os.path.join(@bundle_root, '..', '..', 'sample_data', 'manifest.csv')"),
        "dataset_dir": ("$os.path.join(@bundle_root, '..', '..', '..', 'shared', 'data', 'imagenette')", None),
        "batch_size": (32, 16),
        "preset": ("natural", "dermatology"),
        "pairing": ("simclr", "micle"),
        "patient_aware": (False, True),
    },
    "inference.json": {
        "manifest": (None, "$os.path.join(@bundle_root, '..', '..', 'sample_data', 'manifest.csv')"),
        "dataset_dir": ("$os.path.join(@bundle_root, '..', '..', '..', 'shared', 'data', 'imagenette')", None),
        "split": ("val", None),
    },
    "multi_gpu_train.json": {},
}


def _differences(a: object, b: object, path: str = "") -> dict[str, tuple[object, object]]:
    """Leaf-level differences between two parsed JSON documents, keyed by ``#``-joined path."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: dict[str, tuple[object, object]] = {}
        for k in sorted(set(a) | set(b)):
            sub = f"{path}#{k}" if path else k
            if k not in a or k not in b:
                out[sub] = (a.get(k, "<absent>"), b.get(k, "<absent>"))
            else:
                out.update(_differences(a[k], b[k], sub))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        out = {}
        for i, (x, y) in enumerate(zip(a, b)):
            out.update(_differences(x, y, f"{path}#{i}"))
        return out
    return {} if a == b else {path: (a, b)}


def test_pretraining_bundle_configs_differ_only_where_pinned():
    for name, allowed in ALLOWED.items():
        simclr = json.loads((bundle_path("simclr_natural") / "configs" / name).read_text())
        micle = json.loads((bundle_path("micle_medical") / "configs" / name).read_text())
        assert _differences(simclr, micle) == allowed, name


def test_the_pin_check_sees_a_one_sided_change():
    """The comparison itself: a nested change, an added key and a list element are all differences."""
    a = {"x": 1, "train": {"handlers": [{"n": 1}, {"n": 2}]}}
    b = {"x": 1, "train": {"handlers": [{"n": 1}, {"n": 3}]}, "y": 0}
    assert _differences(a, b) == {"train#handlers#1#n": (2, 3), "y": ("<absent>", 0)}
