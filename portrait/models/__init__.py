"""Models: the Pose2Video bundle and its parts. Built by name (DESIGN §3.3)."""

from portrait.models.bundle import ModelConfig, ModelFolderError, Pose2VideoModel
from portrait.models.pose_guider import PoseGuider

__all__ = ["ModelConfig", "ModelFolderError", "Pose2VideoModel", "PoseGuider"]
