"""Class labels, in the order every model stores and outputs them: the one place they are written down.

Stored with every model (model.json `classes`) and checked when one is loaded, so an edited order can never silently
change what a probability means.
"""

# The 5 patch classes of Shen et al. (2019): background, then benign and malignant calcification and mass.
PATCH_CLASSES = ["background", "calc_benign", "calc_malignant", "mass_benign", "mass_malignant"]
MALIGNANT_PATCH_CLASSES = ("calc_malignant", "mass_malignant")  # summed: a patch's malignant probability
# Whole-image models (whole, finetune): image-level labels 0 and 1 of the manifest.
WHOLE_IMAGE_CLASSES = ["no_cancer", "cancer"]
