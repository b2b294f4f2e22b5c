"""Visual explanations: Group-CAM and the Grad-CAM family behind one registry, localization scores, panels."""

from typing import Any

from cxrdx.explain.registry import METHODS, TITLES, FlatSaliencyWarning, check_methods, default_target_layers, explain

__all__ = [
    "METHODS",
    "TITLES",
    "FlatSaliencyWarning",
    "GroupCamResult",
    "blur",
    "check_methods",
    "default_target_layers",
    "explain",
    "group_cam",
]
_GROUPCAM = ("GroupCamResult", "blur", "group_cam")


def __getattr__(name: str) -> Any:
    """Group-CAM's names, imported on first use (with torch): naming and checking methods stays light."""
    if name in _GROUPCAM:
        from cxrdx.explain import groupcam

        return getattr(groupcam, name)
    raise AttributeError(f"module 'cxrdx.explain' has no attribute {name!r}")
