"""Models: timm bodies, the patch classifier, and the all-convolutional whole-image classifier."""

from cvfast.models.body import Body, create_body
from cvfast.models.patch import PatchClassifier
from cvfast.models.whole import WholeImageClassifier, resnet_top, vgg_top

__all__ = ["Body", "create_body", "PatchClassifier", "WholeImageClassifier", "resnet_top", "vgg_top"]
