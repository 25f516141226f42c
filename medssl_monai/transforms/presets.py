"""Named view recipes (``natural``, ``dermatology``, ``chest_xray``) stored as MONAI bundle config.

A preset is data, not code: one JSON file per recipe under ``preset_configs/`` (shipped inside the
package) holding its tunable parameters at the top level and a ``transforms`` list of
``{"_target_": ...}`` dicts that reference them (``"@strength"``, ``"$0.8 * @strength"``). Parsing
goes through :class:`monai.bundle.ConfigParser`, so the same files can be pasted into a bundle's
``train.json`` and any parameter can be overridden without editing them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser
from monai.transforms import Compose

from ..utils.deprecation import renamed_arg

__all__ = ["PRESET_PACKAGE_DIR", "get_preset", "list_presets", "load_preset_config", "preset_parameters"]

#: Folder (inside the package) holding ``<name>.json`` presets.
PRESET_PACKAGE_DIR = "preset_configs"

_RESERVED = ("_meta_", "transforms")


def _preset_root():
    return resources.files("medssl_monai.transforms").joinpath(PRESET_PACKAGE_DIR)


def list_presets() -> list[str]:
    """Names accepted by :func:`get_preset`, sorted."""
    return sorted(p.name[: -len(".json")] for p in _preset_root().iterdir() if p.name.endswith(".json"))


def load_preset_config(name: str) -> dict[str, Any]:
    """The raw config dict of a preset name, or of a path to a ``.json`` file in the same format."""
    if name.endswith(".json") and Path(name).is_file():
        return json.loads(Path(name).read_text())
    known = list_presets()
    if name not in known:
        raise ValueError(f"unknown view preset {name!r}; known presets: {', '.join(known)}.")
    return json.loads(_preset_root().joinpath(f"{name}.json").read_text())


def preset_parameters(name: str) -> dict[str, Any]:
    """The overridable parameters of a preset with their defaults."""
    return {k: v for k, v in load_preset_config(name).items() if k not in _RESERVED}


@renamed_arg("channels", "in_channels")
def get_preset(
    name: str,
    keys: Sequence[str] | str = ("image",),
    spatial_size: Sequence[int] | int = (64, 64),
    **overrides: Any,
) -> Compose:
    """Build a preset's dictionary pipeline.

    Args:
        name: one of :func:`list_presets` (or a path to a preset-format ``.json``).
        keys: dictionary keys the pipeline transforms.
        spatial_size: output view size (H, W).
        overrides: any top-level parameter of the preset, e.g. ``strength=0.5``,
            ``crop_scale=(0.08, 1.0)``, ``blur_prob=0.0`` (see :func:`preset_parameters`); ``channels`` is
            the former name of ``in_channels``.

    Returns:
        A ``monai.transforms.Compose`` of the preset's transforms.
    """
    config = load_preset_config(name)
    if "transforms" not in config:
        raise ValueError(f"preset {name!r} has no 'transforms' list.")
    allowed = sorted(k for k in config if k not in _RESERVED)
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {unknown} for preset {name!r}; it takes: {', '.join(allowed)}."
        )
    size = [int(s) for s in ((spatial_size,) * 2 if isinstance(spatial_size, int) else spatial_size)]
    config["keys"] = [keys] if isinstance(keys, str) else list(keys)
    config["spatial_size"] = size
    for key, value in overrides.items():
        config[key] = list(value) if isinstance(value, tuple) else value
    if config.get("rot90_prob", 0) > 0 and size[0] != size[1]:
        # quarter turns swap H and W: views of one batch would not stack
        raise ValueError(
            f"preset {name!r} rotates by 90 degrees and needs a square spatial_size, got {size}."
        )
    parser = ConfigParser(config)
    transforms = parser.get_parsed_content("transforms", instantiate=True)
    return Compose(transforms)
