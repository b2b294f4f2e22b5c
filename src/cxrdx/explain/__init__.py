"""Visual explanations: Group-CAM and the Grad-CAM family behind one registry, localization scores, panels."""

from cxrdx.explain.groupcam import GroupCamResult, blur, group_cam
from cxrdx.explain.registry import METHODS, FlatSaliencyWarning, default_target_layers, explain

__all__ = ["METHODS", "FlatSaliencyWarning", "GroupCamResult", "blur", "default_target_layers", "explain", "group_cam"]
